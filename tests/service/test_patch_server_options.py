"""Patches 0001 (--prompt-cache-size) and 0002 (KV cache quantization) on the real server.

Both are guarded (upstream provides the options since 0.31 and 0.32), so they run at the
oldest supported release, where they apply. The patched server runs the demo model on CPU;
what its prompt cache holds and which kind of KV cache it builds is read from the server's
own log lines, which the patches write.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import PatchedRuntime
from tests.helpers import running_server

pytestmark = pytest.mark.slow

MAX_TOKENS = 4
# The demo model's head_dim is 32: quantization groups must divide it.
KV_GROUP = "32"
STORED = re.compile(r"Prompt cache: stored \d+ tokens; (\d+)/(\d+) entries")
EVICTED = re.compile(r"Prompt cache: evicted \d+ tokens; (\d+)/(\d+) entries")
KV_LINE = re.compile(r"KV cache: (\S+) bits=(\d+) group=(\d+) start=(\d+)")


def chat(base_url: str, text: str) -> dict:
    """One non-streaming chat completion; the decoded JSON response."""
    body = {"messages": [{"role": "user", "content": text}], "max_tokens": MAX_TOKENS}
    request = urllib.request.Request(
        f"{base_url}/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        assert response.status == 200
        answer = json.loads(response.read())
    assert answer["object"] == "chat.completion"
    assert answer["choices"][0]["message"]["role"] == "assistant"
    assert 1 <= answer["usage"]["completion_tokens"] <= MAX_TOKENS
    return answer


def log_once(log_path: Path, pattern: re.Pattern[str], count: int, timeout: float = 30) -> str:
    """The server's log once `pattern` occurs `count` times in it (the server writes its
    cache lines just after the response is sent)."""
    deadline = time.monotonic() + timeout
    while True:
        text = log_path.read_text()
        if len(pattern.findall(text)) >= count or time.monotonic() > deadline:
            return text
        time.sleep(0.1)


def two_conversations(base_url: str) -> None:
    """Two unrelated conversations, one after the other."""
    chat(base_url, "hello there")
    chat(base_url, "write a sorting function in python")


def server_args(model: Path, *options: str) -> list[str]:
    return ["--model", str(model), "--log-level", "DEBUG", *options]


def test_prompt_cache_size_one_keeps_only_the_latest_conversation(
    oldest_runtime: PatchedRuntime, demo_model: Path
) -> None:
    args = server_args(demo_model, "--prompt-cache-size", "1")
    with running_server(oldest_runtime.python, args) as (base_url, log_path):
        chat(base_url, "hello there")
        first = log_once(log_path, STORED, 1)
        assert STORED.findall(first) == [("1", "1")], first[-3000:]
        assert not EVICTED.search(first)

        chat(base_url, "write a sorting function in python")
        log = log_once(log_path, EVICTED, 1)
    assert EVICTED.findall(log) == [("1", "1")], log[-3000:]


def test_default_prompt_cache_keeps_both_conversations(
    oldest_runtime: PatchedRuntime, demo_model: Path
) -> None:
    with running_server(oldest_runtime.python, server_args(demo_model)) as (base_url, log_path):
        two_conversations(base_url)
        log = log_once(log_path, STORED, 2)
    assert STORED.findall(log) == [("1", "10"), ("2", "10")], log[-3000:]
    assert not EVICTED.search(log)
    assert not KV_LINE.search(log), "no KV quantization without --kv-bits"


def test_kv_bits_makes_the_caches_quantized(
    oldest_runtime: PatchedRuntime, demo_model: Path
) -> None:
    options = ["--kv-bits", "4", "--kv-group-size", KV_GROUP, "--quantized-kv-start", "0"]
    args = server_args(demo_model, *options, "--prompt-cache-size", "2")
    with running_server(oldest_runtime.python, args) as (base_url, log_path):
        two_conversations(base_url)
        log = log_once(log_path, STORED, 2)
    # Every generation ends with quantized caches, and both are kept in the prompt cache.
    assert KV_LINE.findall(log) == [("QuantizedKVCache", "4", KV_GROUP, "0")] * 2, log[-3000:]
    assert STORED.findall(log) == [("1", "2"), ("2", "2")]


def test_quantization_waits_for_quantized_kv_start(
    oldest_runtime: PatchedRuntime, demo_model: Path
) -> None:
    args = server_args(demo_model, "--kv-bits", "8", "--kv-group-size", KV_GROUP)
    with running_server(oldest_runtime.python, args) as (base_url, log_path):
        chat(base_url, "hello there")
        log = log_once(log_path, KV_LINE, 1)
    # Upstream's default start is 5000 tokens: a short chat keeps full-precision caches.
    assert KV_LINE.findall(log) == [("KVCache", "8", KV_GROUP, "5000")], log[-3000:]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--prompt-cache-size", "0"], "argument --prompt-cache-size: must be at least 1"),
        (["--prompt-cache-size", "-2"], "argument --prompt-cache-size: must be at least 1"),
        (["--kv-bits", "5"], "argument --kv-bits: invalid choice: 5"),
    ],
)
def test_bad_values_fail_at_start(
    oldest_runtime: PatchedRuntime, options: list[str], message: str
) -> None:
    result = subprocess.run(
        [str(oldest_runtime.python), "-m", "mlx_lm.server", *options],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "usage:" in result.stderr
    assert message in result.stderr

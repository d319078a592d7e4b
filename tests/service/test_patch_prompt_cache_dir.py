"""Patch 0005 `--prompt-cache-dir`: a prompt cache on disk that survives restarts.

Every check reads the server's own log ("Prompt cache disk: ...") or the files; never timing."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest

from mlx_local.models.demo_model import build_random_demo_model, corpus_text
from tests.helpers import running_server

pytestmark = pytest.mark.slow

SYSTEM = corpus_text()[:1200]
LOADED = re.compile(r"Prompt cache disk: loaded (\d+) tokens from (\S+)")
SAVED = re.compile(r"Prompt cache disk: saved (\d+) tokens to (\S+)")


def chat(base_url: str, messages: list[dict]) -> dict:
    """A non-streaming chat completion of 3 tokens."""
    body = json.dumps({"messages": messages, "max_tokens": 3, "temperature": 0.0}).encode()
    request = urllib.request.Request(
        f"{base_url}/v1/chat/completions", body, {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def conversation(topic: str) -> list[dict]:
    return [
        {"role": "system", "content": f"{topic}\n{SYSTEM}"},
        {"role": "user", "content": "Summarise the notes."},
    ]


def next_turn(messages: list[dict], reply: dict) -> list[dict]:
    answer = reply["choices"][0]["message"]["content"]
    return [
        *messages,
        {"role": "assistant", "content": answer},
        {"role": "user", "content": "And then?"},
    ]


def shared_prefix(python: Path, model: Path, first: list[dict], second: list[dict]) -> int:
    """How many prompt tokens two chats share, tokenized as the server does: the part of
    the second prompt a cache of the first can serve (a template may add tokens to the
    generation prompt that the history leaves out, e.g. an empty think block)."""
    code = (
        "import json, sys; from pathlib import Path; "
        "from mlx_lm.utils import load_tokenizer; "
        "t = load_tokenizer(Path(sys.argv[1])); "
        "a, b = (t.apply_chat_template(json.loads(m), add_generation_prompt=True) "
        "for m in sys.argv[2:]); "
        "print(next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b))))"
    )
    result = subprocess.run(
        [str(python), "-c", code, str(model), json.dumps(first), json.dumps(second)],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(result.stdout)


def cache_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.safetensors") if not p.name.startswith(".tmp-"))


def serve_once(python: Path, model: Path, args: list[str], messages: list[dict]) -> tuple:
    """Start a server, send one chat, stop it cleanly; (reply, the server's log text)."""
    with running_server(python, ["--model", str(model), *args]) as (url, log):
        reply = chat(url, messages)
    return reply, log.read_text()


def test_restart_serves_the_next_turn_from_disk(patched_runtime, demo_model, tmp_path):
    folder = tmp_path / "prompt-cache"
    args = ["--prompt-cache-dir", str(folder)]
    first = conversation("Project Alpha")
    reply, log = serve_once(patched_runtime.python, demo_model, args, first)
    assert SAVED.search(log), log[-2000:]
    files = cache_files(folder)
    assert len(files) == 1

    # The file is mlx-lm's own prompt cache format, with the tokens in its metadata.
    code = (
        "import json, sys; from mlx_lm.models.cache import load_prompt_cache; "
        "c, m = load_prompt_cache(sys.argv[1], return_metadata=True); "
        "print(len(c), c[0].offset, len(json.loads(m['tokens'])))"
    )
    shown = subprocess.run(
        [str(patched_runtime.python), "-c", code, str(files[0])],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert shown[0] == "2" and shown[1] == shown[2]

    second = next_turn(first, reply)
    reply2, log2 = serve_once(patched_runtime.python, demo_model, args, second)
    loaded = LOADED.search(log2)
    assert loaded, log2[-2000:]
    assert int(loaded.group(1)) >= shared_prefix(patched_runtime.python, demo_model, first, second)
    assert reply2["usage"]["prompt_tokens"] > int(loaded.group(1))

    # Without the option, the server neither reads nor writes the folder.
    before = {p: p.stat().st_mtime_ns for p in cache_files(folder)}
    _, log3 = serve_once(patched_runtime.python, demo_model, [], next_turn(first, reply))
    assert "Prompt cache disk" not in log3
    assert {p: p.stat().st_mtime_ns for p in cache_files(folder)} == before


def test_caches_of_another_model_or_setting_are_ignored(patched_runtime, demo_model, tmp_path):
    folder = tmp_path / "prompt-cache"
    args = ["--prompt-cache-dir", str(folder)]
    first = conversation("Project Beta")
    reply, _ = serve_once(patched_runtime.python, demo_model, args, first)
    (own_file,) = cache_files(folder)
    follow_up = next_turn(first, reply)

    # Same tokenizer and prompt, other weights: never loaded, never removed.
    other = build_random_demo_model(tmp_path / "other-model", seed=7)
    _, log = serve_once(patched_runtime.python, other, args, follow_up)
    assert SAVED.search(log) and not LOADED.search(log), log[-2000:]
    assert own_file.exists()
    (other_folder,) = [p for p in folder.iterdir() if p != own_file.parent]

    # Same model with a quantized KV cache: a different setting, never loaded.
    quantized = [*args, "--kv-bits", "4", "--kv-group-size", "32"]
    _, log = serve_once(patched_runtime.python, demo_model, quantized, follow_up)
    assert not LOADED.search(log), log[-2000:]

    # A file copied into another model's folder is refused by its recorded identity.
    shutil.copy(own_file, other_folder / f"copied-{own_file.name}")
    _, log = serve_once(patched_runtime.python, other, args, follow_up)
    assert f"ignoring copied-{own_file.name}: made for another model or setting" in log
    assert f"copied-{own_file.name}" not in {name for _, name in LOADED.findall(log)}


def test_truncated_file_is_removed_with_a_warning(patched_runtime, demo_model, tmp_path):
    folder = tmp_path / "prompt-cache"
    args = ["--prompt-cache-dir", str(folder)]
    first = conversation("Project Gamma")
    reply, _ = serve_once(patched_runtime.python, demo_model, args, first)
    (saved,) = cache_files(folder)
    data = saved.read_bytes()
    saved.write_bytes(data[: len(data) // 2])

    _, log = serve_once(patched_runtime.python, demo_model, args, next_turn(first, reply))
    assert re.search(rf"WARNING - Prompt cache disk: removed unreadable file {saved.name}", log)
    assert not LOADED.search(log)
    assert not saved.exists()
    assert len(cache_files(folder)) == 1  # the new turn


def test_byte_budget_removes_the_oldest_first(patched_runtime, demo_model, tmp_path):
    folder = tmp_path / "prompt-cache"
    budget = 400_000  # about two entries of this size
    args = [
        "--prompt-cache-dir",
        str(folder),
        "--prompt-cache-dir-bytes",
        str(budget),
        "--prompt-cache-size",
        "1",
    ]
    with running_server(patched_runtime.python, ["--model", str(demo_model), *args]) as (
        url,
        log_path,
    ):
        for topic in ("One", "Two", "Three", "Four", "Five"):
            chat(url, conversation(f"Project {topic}"))
    log = log_path.read_text()
    # Each conversation is saved as it goes (a checkpoint may precede its final entry).
    saved = {name: i for i, (_, name) in enumerate(SAVED.findall(log))}
    removed = re.findall(r"Prompt cache disk: removed (\S+) \(\d+ bytes\) to stay within", log)
    assert len(saved) >= 5, log[-3000:]
    remaining = cache_files(folder)
    assert removed and {p.name for p in remaining}.isdisjoint(removed)
    assert sum(p.stat().st_size for p in remaining) <= budget
    assert max(saved[name] for name in removed) < min(saved[p.name] for p in remaining)
    assert max(saved, key=saved.get) in {p.name for p in remaining}


def test_bad_budget_fails_at_start(patched_runtime, tmp_path):
    result = subprocess.run(
        [
            str(patched_runtime.python),
            "-m",
            "mlx_lm.server",
            "--prompt-cache-dir",
            str(tmp_path),
            "--prompt-cache-dir-bytes",
            "lots",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "--prompt-cache-dir-bytes" in result.stderr

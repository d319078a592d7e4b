"""Patch 0005 `--prompt-cache-dir`: a prompt cache on disk that survives restarts.

Every check reads the server's own log ("Prompt cache disk: ...") or the files; never timing."""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from mlx_local.models.demo_model import build_demo_model, corpus_text
from tests.helpers import running_server

pytestmark = pytest.mark.slow

SYSTEM = corpus_text()[:1200]
LONG = corpus_text()[:6000]  # a system prompt of several blocks
BLOCK = 256  # tokens a block holds (prompt_cache_blocks.BLOCK_TOKENS)
LOADED = re.compile(r"Prompt cache disk: loaded (\d+) tokens from (\S+) \((\d+) files")
SAVED = re.compile(
    r"Prompt cache disk: saved (\d+) tokens to (\S+) \((\d+) new files of (\d+) blocks"
    r" \+ tail, (\d+) bytes"
)


def chat(base_url: str, messages: list[dict]) -> dict:
    """A non-streaming chat completion of 3 tokens."""
    body = json.dumps({"messages": messages, "max_tokens": 3, "temperature": 0.0}).encode()
    request = urllib.request.Request(
        f"{base_url}/v1/chat/completions", body, {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def conversation(topic: str, system: str = SYSTEM) -> list[dict]:
    return [
        {"role": "system", "content": f"{topic}\n{system}"},
        {"role": "user", "content": "Summarise the notes."},
    ]


def answer(reply: dict) -> str:
    return reply["choices"][0]["message"]["content"]


def metric(url: str, name: str) -> float:
    """One sample of GET /metrics (without labels)."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=30) as response:
        text = response.read().decode()
    match = re.search(rf"^mlx_lm_{name} (\S+)$", text, re.M)
    assert match, text
    return float(match.group(1))


def wait_written(url: str, timeout: float = 60) -> None:
    """Until the disk tier has nothing pending (a checkpoint is due within 5 s)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metric(url, "prompt_cache_disk_pending") == 0:
            return
        time.sleep(0.2)
    raise AssertionError("the disk tier kept writing")


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


def blocks_of(folder: Path) -> list[Path]:
    return [p for p in cache_files(folder) if p.name.startswith("b-")]


def tails_of(folder: Path) -> list[Path]:
    return [p for p in cache_files(folder) if p.name.startswith("t")]


def metadata(path: Path) -> dict[str, str]:
    """The metadata of a block or tail file (its safetensors header, read as bytes)."""
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    meta = json.loads(data[8 : 8 + length]).get("__metadata__", {})
    return {k.split(".", 1)[-1]: v for k, v in meta.items() if k.startswith("0.")}


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
    (model_folder,) = [p for p in folder.iterdir() if p.is_dir()]
    identity = json.loads((model_folder / "identity.json").read_text())
    assert identity["block_tokens"] == BLOCK and identity["size"] == 1
    assert str(demo_model.resolve()) in json.dumps(identity)

    # Each file is mlx-lm's own prompt cache format: a block holds BLOCK tokens of every
    # layer, the tail the rest; together the tokens of the turn.
    code = (
        "import json, sys; from mlx_lm.models.cache import load_prompt_cache; "
        "c, m = load_prompt_cache(sys.argv[1], return_metadata=True); "
        "print(len(c), c[0].offset, len(json.loads(m['tokens'])))"
    )
    held = 0
    for path in cache_files(folder):
        shown = subprocess.run(
            [str(patched_runtime.python), "-c", code, str(path)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        assert shown[0] == "2" and shown[1] == shown[2]
        assert path.name.startswith("t") or int(shown[1]) == BLOCK
        held += int(shown[1])
    assert held == int(SAVED.findall(log)[-1][0])

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
    own_file = cache_files(folder)[0]
    follow_up = next_turn(first, reply)

    # Same tokenizer and prompt, other weights: never loaded, never removed.
    other = build_demo_model(tmp_path / "other-model", seed=7)
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
    assert f"copied-{own_file.name}" not in {name for _, name, _ in LOADED.findall(log)}


def test_old_whole_entry_folders_are_removed_at_first_start(patched_runtime, demo_model, tmp_path):
    folder = tmp_path / "prompt-cache"
    old = folder / "0123456789abcdef"
    old.mkdir(parents=True)
    code = (
        "import sys, json, mlx.core as mx; from mlx_lm.models.cache import KVCache, "
        "save_prompt_cache; c = KVCache(); c.update_and_fetch(mx.zeros((1, 2, 8, 4)), "
        "mx.zeros((1, 2, 8, 4))); save_prompt_cache(sys.argv[1], [c], "
        "{'tokens': json.dumps(list(range(8))), 'identity': '{}'})"
    )
    entry = old / "0123456789abcdef01234567.safetensors"
    subprocess.run([str(patched_runtime.python), "-c", code, str(entry)], check=True)
    _, log = serve_once(
        patched_runtime.python,
        demo_model,
        ["--prompt-cache-dir", str(folder)],
        conversation("Project Old"),
    )
    assert "removed 1 whole-entry files of the format before blocks" in log, log[-2000:]
    assert not old.exists()
    assert SAVED.search(log)


def test_truncated_block_ends_the_chain_there(patched_runtime, demo_model, tmp_path):
    folder = tmp_path / "prompt-cache"
    args = ["--prompt-cache-dir", str(folder)]
    first = conversation("Project Gamma", LONG)
    reply, _ = serve_once(patched_runtime.python, demo_model, args, first)
    chain = sorted(blocks_of(folder), key=lambda p: int(metadata(p)["start"]))
    assert len(chain) >= 4
    bad = chain[2]
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])

    second = next_turn(first, reply)
    reply2, log = serve_once(patched_runtime.python, demo_model, args, second)
    assert re.search(rf"WARNING - Prompt cache disk: removed unreadable file {bad.name}", log)
    loaded = LOADED.search(log)
    assert loaded and int(loaded.group(1)) == 2 * BLOCK, log[-3000:]
    assert reply2["usage"]["prompt_tokens_details"]["cached_tokens"] == 2 * BLOCK
    # the answer is the one a cold server gives
    cold, _ = serve_once(patched_runtime.python, demo_model, [], second)
    assert answer(reply2) == answer(cold)
    # the block was written again by that turn
    assert bad.exists() and len(blocks_of(folder)) >= len(chain)


def test_byte_budget_removes_chains_from_their_tips(patched_runtime, demo_model, tmp_path):
    folder = tmp_path / "prompt-cache"
    budget = 2_000_000  # the shared prefix and two or three sessions of their own
    args = [
        "--prompt-cache-dir",
        str(folder),
        "--prompt-cache-dir-bytes",
        str(budget),
        "--prompt-cache-size",
        "1",
    ]
    shared_blocks: set[str] = set()
    with running_server(patched_runtime.python, ["--model", str(demo_model), *args]) as (
        url,
        log_path,
    ):
        for i, topic in enumerate(("One", "Two", "Three", "Four", "Five", "Six", "Seven")):
            # every session shares the long system prompt, then goes its own way
            messages = [
                {"role": "system", "content": LONG},
                {
                    "role": "user",
                    "content": f"Project {topic}: {corpus_text()[i * 700 : i * 700 + 900]}",
                },
            ]
            chat(url, messages)
            wait_written(url)
            files = cache_files(folder)
            assert sum(p.stat().st_size for p in files) <= budget
            starts = {p.name: int(metadata(p)["start"]) for p in blocks_of(folder)}
            if i == 0:
                shared_blocks = {n for n, s in starts.items() if s + BLOCK <= 4 * BLOCK}
            assert shared_blocks <= set(starts), f"a shared block was removed at session {i}"
    log = log_path.read_text()
    removed = re.findall(r"Prompt cache disk: removed (\S+) \(\d+ bytes\) to stay within", log)
    assert removed, log[-3000:]
    assert shared_blocks.isdisjoint(removed)
    # the newest session is whole: its tail is on disk
    assert tails_of(folder)


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

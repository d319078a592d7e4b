"""Patch 0005's disk tier per rank (issue 21): a [distributed] group of two ring ranks on
127.0.0.1 (mlx.launch, the patched server) keeps each rank's shard in its own folder, and
the ranks agree on the prefix they all have before they use it.

Every check reads the ranks' log ("Prompt cache disk: ... on rank R of N"), the usage the
server reports and the files; answers are compared with a single server's."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from mlx_local.models.demo_variant import build_variant
from mlx_local.processes import terminate
from mlx_local.service.process import wait_healthy
from tests.helpers import free_port
from tests.service.distributed_helpers import free_port_block
from tests.service.test_patch_prompt_cache_dir import (
    BLOCK,
    LONG,
    answer,
    chat,
    conversation,
    metadata,
    next_turn,
    serve_once,
    shared_prefix,
)

pytestmark = pytest.mark.slow

LOADED = re.compile(r"Prompt cache disk: loaded (\d+) tokens from \S+ \(.*on rank (\d) of (\d)\)")
SAVED = re.compile(r"Prompt cache disk: saved (\d+) tokens to .* bytes in .* on rank (\d) of (\d)")


@contextmanager
def ring_group(
    python: Path, model: Path, args: list[str], size: int = 2, mode: str = "tensor"
) -> Iterator[tuple[subprocess.Popen, str, Path]]:
    """`size` ring ranks on 127.0.0.1 under mlx.launch; (launcher, base URL, log path)."""
    port = free_port()
    log_path = Path(tempfile.mkstemp(prefix="mlx-ring-", suffix=".log")[1])
    command = [
        str(python.parent / "mlx.launch"), "--backend", "ring",
        "--hosts", ",".join(["127.0.0.1"] * size), "--starting-port", str(free_port_block()),
        "--", str(python), "-m", "mlx_lm.server", "--model", str(model),
        "--host", "127.0.0.1", "--port", str(port), *args,
        *(["--pipeline"] if mode == "pipeline" else []),
    ]  # fmt: skip
    stdin_read, stdin_write = os.pipe()  # mlx.launch spins on a stdin at end of file
    with log_path.open("w") as log:
        process = subprocess.Popen(
            command,
            stdin=stdin_read,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    os.close(stdin_read)
    try:
        if not wait_healthy("127.0.0.1", port, 240, lambda: process.poll() is None, 0.3):
            raise AssertionError(f"the group did not start:\n{log_path.read_text()[-3000:]}")
        yield process, f"http://127.0.0.1:{port}", log_path
    finally:
        terminate(process.pid, 60, group=True)  # every rank, then the launcher
        process.wait(30)
        os.close(stdin_write)


def rank_folders(folder: Path, size: int = 2, mode: str = "tensor") -> list[Path]:
    """Each rank's folder under the disk tier's root, by rank."""
    return [next(folder.glob(f"*-rank{r}of{size}-{mode}")) for r in range(size)]


def wait_saved(log_path: Path, tokens: int, ranks: int = 2, timeout: float = 60) -> None:
    """Until every rank logged a save of at least `tokens` tokens."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = {int(r) for n, r, _ in SAVED.findall(log_path.read_text()) if int(n) >= tokens}
        if len(done) == ranks:
            return
        time.sleep(0.2)
    raise AssertionError(f"not every rank saved:\n{log_path.read_text()[-3000:]}")


def loads(log_path: Path) -> dict[int, int]:
    """Tokens each rank loaded from its disk tier (the last load of each)."""
    return {int(r): int(n) for n, r, _ in LOADED.findall(log_path.read_text())}


def test_two_ranks_restart_warm_from_their_shards(patched_runtime, demo_model, tmp_path):
    python = patched_runtime.python
    folder = tmp_path / "prompt-cache"
    args = ["--prompt-cache-dir", str(folder)]
    messages = conversation("Project Ring", LONG)
    with ring_group(python, demo_model, args) as (_, url, log):
        reply = chat(url, messages)
        wait_saved(log, reply["usage"]["prompt_tokens"])
    ranks = rank_folders(folder)
    sizes = [sum(p.stat().st_size for p in r.glob("*.safetensors")) for r in ranks]
    names = [sorted(p.name for p in r.glob("b-*.safetensors")) for r in ranks]
    assert names[0] and names[0] != names[1]  # the rank is part of every block's identity
    # tensor parallel: each rank holds half of the KV heads
    single_reply, single_log = serve_once(python, demo_model, args, messages)
    single = [p for p in folder.iterdir() if p.is_dir() and "-rank" not in p.name]
    one = sum(p.stat().st_size for p in single[0].glob("*.safetensors"))
    assert all(0.4 < s / one < 0.6 for s in sizes), (sizes, one)

    second = next_turn(messages, reply)
    with ring_group(python, demo_model, args) as (_, url, log):
        reply2 = chat(url, second)
        text = log.read_text()
    shared = shared_prefix(python, demo_model, messages, second)
    got = loads(log)
    assert set(got) == {0, 1} and got[0] == got[1] >= shared, text[-3000:]
    assert reply2["usage"]["prompt_tokens_details"]["cached_tokens"] == got[0]
    alone, _ = serve_once(python, demo_model, [], second)
    assert answer(reply2) == answer(alone)


def test_a_rank_that_lost_blocks_sets_the_common_prefix(patched_runtime, demo_model, tmp_path):
    python = patched_runtime.python
    folder = tmp_path / "prompt-cache"
    args = ["--prompt-cache-dir", str(folder)]
    messages = conversation("Project Crash", LONG)
    with ring_group(python, demo_model, args) as (process, url, log):
        reply = chat(url, messages)
        wait_saved(log, reply["usage"]["prompt_tokens"])
        os.killpg(process.pid, signal.SIGKILL)  # the whole group dies, no shutdown
        process.wait(30)
    rank0, rank1 = rank_folders(folder)
    chain = sorted(rank1.glob("b-*.safetensors"), key=lambda p: int(metadata(p)["start"]))
    for path in chain[3:]:
        path.unlink()  # rank 1 lost all but its first three blocks
    for path in rank1.glob("t*.safetensors"):
        path.unlink()

    second = next_turn(messages, reply)
    with ring_group(python, demo_model, args) as (_, url, log):
        reply2 = chat(url, second)  # answered: no rank waits for another forever
        text = log.read_text()
    got = loads(log)
    # rank 0 has the whole turn, rank 1 three blocks: both use three blocks
    assert got == {0: 3 * BLOCK, 1: 3 * BLOCK}, text[-3000:]
    assert reply2["usage"]["prompt_tokens_details"]["cached_tokens"] == 3 * BLOCK
    alone, _ = serve_once(python, demo_model, [], second)
    assert answer(reply2) == answer(alone)

    # rank 1 lost everything: no rank uses its disk tier, the answer is still right
    for r in rank1.glob("*.safetensors"):
        r.unlink()
    with ring_group(python, demo_model, args) as (_, url, log):
        reply3 = chat(url, second)
    assert loads(log) == {}
    assert reply3["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert answer(reply3) == answer(alone)


def test_other_group_shapes_never_load_the_shards(patched_runtime, tmp_path):
    python = patched_runtime.python
    # the Qwen2 layout: mlx-lm 0.32 splits it by heads (tensor) and by layers (pipeline)
    model = build_variant(tmp_path / "demo-qwen2-4l", num_hidden_layers=4)
    folder = tmp_path / "prompt-cache"
    args = ["--prompt-cache-dir", str(folder)]
    messages = conversation("Project Shape", LONG)
    with ring_group(python, model, args) as (_, url, log):
        reply = chat(url, messages)
        wait_saved(log, reply["usage"]["prompt_tokens"])
    before = {p: p.stat().st_mtime_ns for p in folder.rglob("*.safetensors")}
    second = next_turn(messages, reply)
    # a single server (another group size) neither loads nor touches the ranks' files
    _, single_log = serve_once(python, model, args, second)
    assert "Prompt cache disk: loaded" not in single_log
    # pipeline ranks (another mode) neither; they keep shards of their own
    with ring_group(python, model, args, mode="pipeline") as (_, url, log):
        chat(url, second)
        wait_saved(log, 1)
        text = log.read_text()
    assert "Prompt cache disk: loaded" not in text, text[-3000:]
    assert len(rank_folders(folder, mode="pipeline")) == 2
    assert {p: p.stat().st_mtime_ns for p in before} == before

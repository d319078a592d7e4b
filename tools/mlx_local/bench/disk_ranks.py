"""Benchmark: the next turn after a group restart, with the per-rank disk tier (issue 21).

One run, two ring ranks on 127.0.0.1 under `mlx.launch` (the demo model, tensor mode): a
conversation with a long system prompt, then its next turn timed (TTFT) three ways: warm in
memory (same group), after a restart of the group with `--prompt-cache-dir` (each rank loads
its own shard), after a restart without it (cold). Also the bytes each rank wrote for the
conversation against a single server's.

    .venv/bin/python -m mlx_local.bench.disk_ranks [--system-tokens N] [--ranks N]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .. import project
from ..errors import UserError
from ..models.demo_model import build_demo_model
from ..processes import free_port, terminate
from ..service import cluster
from ..service.process import wait_healthy
from .prompts import PromptMaker
from .server import BenchServer, Reply, stream_request


@contextmanager
def ring(python: Path, model: Path, args: list[str], ranks: int, log: Path) -> Iterator[int]:
    """`ranks` ring ranks on 127.0.0.1 serving `model`; yields rank 0's port."""
    port = free_port()
    command = [
        str(cluster.launcher(python)), "--backend", "ring", "-n", str(ranks),
        "--starting-port", str(port + 1000 if port < 60000 else port - 20000), "--",
        str(python), "-m", "mlx_lm.server", "--model", str(model), "--host", "127.0.0.1",
        "--port", str(port), *args,
    ]  # fmt: skip
    stdin_read, stdin_write = os.pipe()  # mlx.launch spins on a stdin at end of file
    with log.open("a") as out:
        launch = subprocess.Popen(
            command, stdin=stdin_read, stdout=out, stderr=out, start_new_session=True
        )
    os.close(stdin_read)
    try:
        if not wait_healthy("127.0.0.1", port, 600, lambda: launch.poll() is None):
            raise UserError(f"the group did not start; see {log}")
        yield port
    finally:
        terminate(launch.pid, 60, group=True)
        launch.wait()
        os.close(stdin_write)


def _turn(port: int, messages: list[dict]) -> Reply:
    body = {"messages": messages, "max_tokens": 4, "temperature": 0.0, "stream": True}
    body["stream_options"] = {"include_usage": True}
    return stream_request(port, "/v1/chat/completions", body)


def _folder_bytes(folders: list[Path]) -> list[int]:
    return [sum(p.stat().st_size for p in f.glob("*.safetensors")) for f in folders]


def _wait_files(root: Path, pattern: str, count: int, timeout: float = 120) -> list[Path]:
    """Until `count` folders matching `pattern` each hold a tail (their entry is written)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        folders = sorted(root.glob(pattern))
        if len(folders) == count and all(any(f.glob("t*.safetensors")) for f in folders):
            time.sleep(0.5)
            return folders
        time.sleep(0.2)
    raise UserError(f"the entries were not written under {root}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--system-tokens", type=int, default=4000)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--python", type=Path, default=project.runtime_python())
    args = parser.parse_args(argv)
    python, n = args.python, args.ranks
    with tempfile.TemporaryDirectory(prefix="bench-disk-ranks-") as tmp:
        root = Path(tmp)
        model = build_demo_model(root / "demo")
        system = PromptMaker(model).text(args.system_tokens)
        first = [{"role": "system", "content": system}, {"role": "user", "content": "Hi."}]
        disk = root / "prompt-cache"
        log = root / "group.log"
        with ring(python, model, ["--prompt-cache-dir", str(disk)], n, log) as port:
            reply = _turn(port, first)
            second = [
                *first,
                {"role": "assistant", "content": reply.text},
                {"role": "user", "content": "And then?"},
            ]
            folders = _wait_files(disk, f"*-rank*of{n}-tensor", n)
            ranks_bytes = _folder_bytes(folders)
            warm = _turn(port, second)
        with ring(python, model, ["--prompt-cache-dir", str(disk)], n, log) as port:
            restored = _turn(port, second)
        with ring(python, model, [], n, log) as port:
            cold = _turn(port, second)
        single_dir = root / "single"
        with BenchServer(python, model, ["--prompt-cache-dir", str(single_dir)], log) as one:
            _turn(one.port, first)
            single_bytes = _folder_bytes(_wait_files(single_dir, "*", 1))[0]
        loaded = [
            line for line in log.read_text().splitlines() if "Prompt cache disk: loaded" in line
        ]
    print(f"{n} ranks, tensor, a {reply.prompt_tokens}-token first turn; next turn's TTFT:")
    for label, r in (
        ("warm in memory", warm),
        ("after a restart, per-rank disk", restored),
        ("after a restart, no disk tier", cold),
    ):
        print(f"  {label:<31}{r.ttft:8.3f} s  ({r.ttft / warm.ttft:.2f}x warm)")
    print(f"  disk tier / cold: {restored.ttft / cold.ttft:.3f}")
    shares = ", ".join(f"{b} B ({b / single_bytes:.2f})" for b in ranks_bytes)
    print(f"bytes per rank for the entry: {shares}; one server: {single_bytes} B")
    for line in loaded:
        print(f"  {line.split(' - INFO - ')[-1]}")
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except UserError as error:
        raise SystemExit(f"bench.disk_ranks: {error}") from None

"""One rank against a group on the same model, in one run: TTFT, decode tokens/s, memory.

    python -m mlx_local.bench.cluster [--ranks 2] [--mode tensor|pipeline]

The model is a wider demo variant (Qwen2 layout, ~120M parameters, float32 weights of about
470 MB: float16 is slow on a CPU) so that each rank's share of the weights stands out from
the runtime's own memory.
The runtime's memory is measured too, on the 2-layer demo model, and subtracted. Ranks of
the group run on 127.0.0.1 with the ring backend, started by `mlx.launch` exactly as
`mlx-local serve` starts them. On one small shared machine this shows the mechanism (the
weights are split), not a speed-up: the ranks share the same cores and talk over loopback.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .. import project
from ..config_distributed import Distributed
from ..models.demo_model import build_demo_model
from ..models.demo_variant import build_variant
from ..processes import free_port, process_info
from ..project import Project
from ..service import cluster
from ..service.command import ServerCommand
from ..service.process import wait_healthy
from .prompts import end_of_text_ids
from .server import BenchServer, Reply, stream_request

WIDE = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 8,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
}
PROMPT = "Explain how a ring of processes shares the work of one model. " * 12
MAX_TOKENS = 32
# What mlx itself holds after the server's own sharded_load: the weights of each rank.
LOAD_PROBE = """
import sys, mlx.core as mx
from mlx_lm.utils import sharded_load
group = mx.distributed.init()
pipe = sys.argv[2] == "pipeline"
model = sharded_load(sys.argv[1], pipeline_group=group if pipe else None,
                     tensor_group=None if pipe else group)
print(f"rank {group.rank()} holds {mx.get_active_memory()}", flush=True)
"""


@dataclass
class Result:
    """One configuration's numbers."""

    label: str
    ttft: float
    decode_tps: float | None
    rank_rss: list[int]


def _requests(port: int, model: Path) -> Reply:
    bias = {str(i): -100.0 for i in end_of_text_ids(model)}
    warm = {"messages": [{"role": "user", "content": "warm up"}], "max_tokens": 2}
    stream_request(port, "/v1/chat/completions", {**warm, "stream": True})
    body = {
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0.0,
        "logit_bias": bias,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    return stream_request(port, "/v1/chat/completions", body)


def single(python: Path, model: Path, logs: Path) -> Result:
    """The model on one process, as `mlx-local serve` runs it without [distributed]."""
    with BenchServer(python, model, ["--prompt-cache-size", "1"], logs / "one.log") as server:
        reply = _requests(server.port, model)
        info = process_info(server.process.pid)
        return Result("1 rank", reply.ttft, reply.decode_tps, [info.rss_bytes if info else 0])


def group(python: Path, model: Path, ranks: int, mode: str, root: Path, logs: Path) -> Result:
    """The model on `ranks` ranks under mlx.launch (ring, 127.0.0.1), each rank's peak RSS."""
    port = free_port()
    spec = Distributed(
        hosts=("127.0.0.1",) * ranks,
        backend="ring",
        mode=mode,
        remote_root=root,
        remote_python=None,
        starting_port=port + 1000 if port < 60000 else port - 20000,
    )
    argv = [str(python), "-m", "mlx_lm.server", "--model", str(model)]
    argv += ["--host", "127.0.0.1", "--port", str(port), "--prompt-cache-size", "1"]
    command = cluster.launch_command(Project(root), spec, python, ServerCommand(argv))
    stdin_read, stdin_write = os.pipe()  # mlx.launch spins on a stdin at end of file
    with (logs / f"group-{ranks}-{mode}.log").open("w") as log:
        launch = subprocess.Popen(
            command.argv, stdin=stdin_read, stdout=log, stderr=log, start_new_session=True
        )
    os.close(stdin_read)
    try:
        if not wait_healthy("127.0.0.1", port, 600, lambda: launch.poll() is None):
            raise RuntimeError(f"the group did not start; see {logs}")
        reply = _requests(port, model)
        rank_list = cluster.ranks(Project(root), spec)
        rss = [state.rss_bytes or 0 for state in cluster.signal_ranks(rank_list)]
        cluster.stop_ranks(rank_list, 10)
        return Result(f"{ranks} ranks ({mode})", reply.ttft, reply.decode_tps, rss)
    finally:
        if launch.poll() is None:
            os.killpg(launch.pid, signal.SIGKILL)
        launch.wait()
        os.close(stdin_write)


def held_by_rank(python: Path, model: Path, ranks: int, mode: str) -> list[int]:
    """Bytes mlx holds on each rank after sharded_load (mx.get_active_memory)."""
    launch = [str(cluster.launcher(python)), "-n", str(ranks), "--backend", "ring"]
    launch += ["--starting-port", str(free_port()), "--", str(python), "-c", LOAD_PROBE]
    stdin_read, stdin_write = os.pipe()
    try:
        argv = [*launch, str(model), mode]
        out = subprocess.run(argv, stdin=stdin_read, capture_output=True, text=True, timeout=600)
        out = out.stdout
    finally:
        os.close(stdin_read)
        os.close(stdin_write)
    held = dict(line.split()[1::2] for line in out.splitlines() if line.startswith("rank "))
    return [int(held[str(rank)]) for rank in range(ranks)]


def _mib(count: int) -> str:
    return f"{count / 2**20:.0f} MiB"


def main(argv: list[str] | None = None) -> int:
    """Run the comparison and print one table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--mode", choices=("tensor", "pipeline"), default="tensor")
    parser.add_argument("--python", type=Path, default=project.runtime_python())
    args = parser.parse_args(argv)
    python = args.python
    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as tmp:
        root = Path(tmp)
        logs = root / "logs"
        logs.mkdir()
        wide = build_variant(root / "wide", float32=True, **WIDE)
        tiny = build_demo_model(root / "tiny")
        weights = sum(p.stat().st_size for p in wide.glob("*.safetensors"))
        started = time.monotonic()
        with BenchServer(python, tiny, [], logs / "runtime.log") as runtime:
            _requests(runtime.port, tiny)
            base = process_info(runtime.process.pid).rss_bytes
        results = [
            single(python, wide, logs),
            group(python, wide, args.ranks, args.mode, root, logs),
        ]
        print(f"model: {_mib(weights)} of weights; runtime alone (2-layer demo): {_mib(base)}")
        header = f"{'':<20}{'TTFT':>9}{'decode tok/s':>14}"
        print(f"{header}  RSS per rank after the requests (minus the runtime's)")
        for result in results:
            memory = ", ".join(f"{_mib(r)} ({_mib(r - base)})" for r in result.rank_rss)
            tps = f"{result.decode_tps:.1f}" if result.decode_tps else "-"
            print(f"{result.label:<20}{result.ttft:>8.2f}s{tps:>14}  {memory}")
        held = held_by_rank(python, wide, args.ranks, args.mode)
        print(
            f"mlx active memory per rank after the {args.mode} load: "
            + ", ".join(f"{_mib(h)} ({h / weights:.2f} of the weights)" for h in held)
        )
        one, many = results[0], results[1]
        share = [(r - base) / max(one.rank_rss[0] - base, 1) for r in many.rank_rss]
        print(
            f"ratios {many.label} / 1 rank: TTFT {many.ttft / one.ttft:.2f}x, decode "
            f"{(many.decode_tps or 0) / (one.decode_tps or 1):.2f}x, model memory per rank "
            + ", ".join(f"{s:.2f}" for s in share)
            + f" (ideal {1 / args.ranks:.2f}); {time.monotonic() - started:.0f}s"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Command `mlx-local bench`: run the benchmarks, render tables, write JSON and a PNG chart."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.table import Table

from .. import project
from ..console import console
from ..errors import UserError
from ..locking import project_lock
from .chart import write_chart
from .model import ensure_model
from .run import run
from .settings import settings as bench_settings


def register(sub: argparse._SubParsersAction) -> None:
    """Add `bench`."""
    parser = sub.add_parser(
        "bench",
        help="benchmark the patched server against upstream's (TTFT, decode, KV memory)",
        description="Run the patched server and the unpatched upstream server of the same "
        "release on the same model, and report TTFT cold vs warm, decode tokens/s, KV cache "
        "bytes, prompt cache behaviour and peak memory. Writes bench.json and bench.png.",
    )
    parser.add_argument("--quick", action="store_true", help="tiny prompts: a plumbing check")
    parser.add_argument(
        "--model",
        type=Path,
        help="local model folder (default: the bench model, or the demo model with --quick)",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="output folder (default: bench-results/)"
    )
    parser.add_argument(
        "--repeats", type=int, default=None, help="runs per figure (default: 3, 1 with --quick)"
    )
    parser.set_defaults(handler=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    """bench: measure, then render."""
    proj = project.current()
    if args.repeats is not None and args.repeats < 1:
        raise UserError("--repeats must be at least 1")
    if args.model is not None:
        model = args.model.resolve()
        if not (model / "config.json").is_file():
            raise UserError(f"{model} is not a model folder (no config.json); pass a local model")
    else:
        with project_lock(proj.state_dir, "bench-model"):
            model = ensure_model(proj.models_dir, args.quick)
    out_dir = (args.out or proj.root / "bench-results").resolve()
    settings = bench_settings(model, out_dir, args.quick, args.repeats)
    with console.status("benchmarking") as status:
        results = run(proj, project.runtime_python(), settings, status.update)
    chart = write_chart(results, out_dir / "bench.png")
    render(results)
    console.print(f"results: [bold]{out_dir / 'bench.json'}[/], chart: [bold]{chart}[/]")
    return 0


def seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f} s"


def times(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}×"


def rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def mib(value: int | None) -> str:
    if value is None:
        return "-"
    return f"{value / 2**20:.1f} MiB" if value >= 2**20 else f"{value / 2**10:.1f} KiB"


def render(results: dict) -> None:
    """Print every figure of `results` as rich tables."""
    meta = results["meta"]
    console.print(
        f"model {meta['model']} · mlx-lm {meta['base']} · median of {meta['repeats']} · "
        f"{meta['seconds']} s",
        highlight=False,
    )
    ttft = Table(title="Time to first token: cold vs warm follow-up sharing the prefix")
    for column in ("prefix", "server", "prompt tokens", "cold", "warm", "warm/cold"):
        ttft.add_column(column, justify="right")
    prefixes = next(iter(results["ttft"].values()))
    for prefix in prefixes:
        for variant, rows in results["ttft"].items():
            entry = rows[prefix]
            ttft.add_row(
                prefix,
                variant,
                rate(entry["prompt_tokens"]).removesuffix(".0"),
                seconds(entry["cold_s"]),
                seconds(entry["warm_s"]),
                times(entry["warm_over_cold"]),
            )
    console.print(ttft)

    decode = Table(title="Decode tokens/s")
    for column in ("server", "short context", "long context (tokens)"):
        decode.add_column(column, justify="right")
    for variant, entry in results["decode"].items():
        decode.add_row(
            variant,
            rate(entry["short_tps"]),
            f"{rate(entry['long_tps'])} ({entry['long_context']})",
        )
    console.print(decode)

    kv = results["kv_cache"]
    longest = str(max(int(c) for c in kv["configs"]["fp16"]["bytes"]))
    table = Table(title=f"KV cache at {longest} tokens (in-process, group size {kv['group_size']})")
    for column in ("cache", "bytes", "/ fp16", "decode tok/s", "/ fp16"):
        table.add_column(column, justify="right")
    for label, entry in kv["configs"].items():
        table.add_row(
            label,
            mib(entry["bytes"][longest]),
            times(entry["bytes_over_fp16"]),
            rate(entry["decode_tps"]),
            times(entry["decode_over_fp16"]),
        )
    console.print(table)

    server = Table(title="Patched server per KV setting (long conversation)")
    for column in ("configuration", "context", "cold TTFT", "decode tok/s"):
        server.add_column(column, justify="right")
    for label, entry in kv["server"].items():
        server.add_row(
            label, str(entry["context"]), seconds(entry["cold_s"]), rate(entry["decode_tps"])
        )
    console.print(server)

    inter = Table(title="Conversations A, B, then back to A")
    for column in ("configuration", "A cold TTFT", "return to A", "return/cold"):
        inter.add_column(column, justify="right")
    for label, entry in results["interleaved"].items():
        if "note" in entry:
            inter.add_row(label, entry["note"], "", "")
            continue
        inter.add_row(
            label,
            seconds(entry["cold_s"]),
            seconds(entry["return_to_a_s"]),
            times(entry["return_over_cold"]),
        )
    console.print(inter)

    restart = results["restart"]
    if not restart["available"]:
        console.print(f"[yellow]restart with disk cache:[/] not available ({restart['note']})")
    else:
        table = Table(title=f"Next turn right after a restart ({restart['context']} tokens)")
        for column in ("configuration", "cold TTFT", "after restart", "/ warm in-memory"):
            table.add_column(column, justify="right")
        for label in ("without disk cache", "with disk cache"):
            entry = restart[label]
            table.add_row(
                label,
                seconds(entry["cold_s"]),
                seconds(entry["after_restart_s"]),
                times(entry["over_warm_in_memory"]),
            )
        console.print(table)

    memory = Table(title="Peak RSS of the server")
    memory.add_column("configuration")
    memory.add_column("peak RSS", justify="right")
    for label, value in results["peak_rss_bytes"].items():
        memory.add_row(label, mib(value))
    console.print(memory)

"""`mlx-local plan`: what a model needs in memory at each context, against this machine."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, replace

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .. import config as config_mod
from .. import project
from ..errors import UserError
from ..service.command import resolve_model
from . import kv
from . import machine as machine_mod
from .estimate import SEARCH_LIMIT, Settings, gib, largest_context, need, verdict
from .guard import model_folder
from .machine import sysctl_line
from .model_shape import ModelShape, read_shape

console = Console(soft_wrap=True)
DEFAULT_CONTEXTS = (4096, 8192, 32768, 65536, 131072)
DEFAULT_KV_BITS = (8, 4)


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `plan` command."""
    p = sub.add_parser(
        "plan", help="memory a model needs (weights, KV cache, prompt cache) against this machine"
    )
    p.add_argument("model", nargs="?", help="model to plan for (default: the configured one)")
    p.add_argument("--context", type=int, nargs="+", metavar="N", help="context lengths in tokens")
    p.add_argument(
        "--kv-bits",
        type=int,
        nargs="+",
        choices=config_mod.KV_BITS,
        metavar="B",
        help="KV-cache bits to compare with full precision (default: the configured, or 8 4)",
    )
    p.add_argument(
        "--kv-group-size",
        type=int,
        choices=config_mod.KV_GROUP_SIZES,
        help="KV quantization group (default: the configured, or one that divides the head size)",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=_plan)


def _contexts(args: argparse.Namespace, shape: ModelShape) -> list[int]:
    if args.context:
        if min(args.context) < 1:
            raise UserError("--context takes token counts >= 1")
        return sorted(set(args.context))
    top = shape.max_context or max(DEFAULT_CONTEXTS)
    return sorted({n for n in DEFAULT_CONTEXTS if n < top} | {top})


def _group_size(args: argparse.Namespace, options: dict, shape: ModelShape) -> int:
    group = args.kv_group_size or options.get("kv_group_size") or kv.DEFAULT_GROUP_SIZE
    if args.kv_group_size is None and "kv_group_size" not in options:
        group = next((g for g in (64, 128, 32) if shape.head_dim % g == 0), group)
    problem = kv.group_size_problem(shape, group)
    if problem:
        raise UserError(problem)
    return group


def build(args: argparse.Namespace) -> dict:
    """The plan as a JSON-ready dict."""
    proj = project.current()
    cfg = config_mod.load(proj)
    model = resolve_model(args.model or cfg.model, proj)
    folder = model_folder(model)
    if folder is None:
        raise UserError(f"model {model.spec!r} is not downloaded yet; start it once, or convert it")
    shape = read_shape(folder)
    configured = Settings.from_config(cfg)
    group = _group_size(args, cfg.options, shape)
    settings = replace(configured, kv_group_size=group)
    requested = args.kv_bits or (
        [cfg.options["kv_bits"]] if "kv_bits" in cfg.options else DEFAULT_KV_BITS
    )
    notes = []
    if settings.hosts > 1:
        notes.append(
            f"[distributed] group of {settings.hosts} hosts: every figure is one host's share "
            "(weights and KV caches split evenly), against this machine's memory"
        )
    if any(layer.kind == "sliding" for layer in shape.layers):
        notes.append(kv.SLIDING_PROBLEM)
        requested = []
    bits_list = [None, *requested]
    machine = machine_mod.read()
    budget = machine.budget_bytes
    rows = []
    for context in _contexts(args, shape):
        for bits in bits_list:
            n = need(shape, settings, context, bits)
            rows.append({**asdict(n), "fits": n.total_bytes <= budget})
    cap = shape.max_context or SEARCH_LIMIT
    largest = {
        _label(bits, shape): min(largest_context(shape, settings, bits, budget), cap)
        for bits in bits_list
    }
    worst = max(rows, key=lambda r: r["total_bytes"])
    return {
        "model": str(folder),
        "model_type": shape.model_type,
        "weights": {"bytes": shape.weights_bytes, "quantization": shape.quantization},
        "kv_cache": {
            "dtype": shape.kv_dtype,
            "layers": {
                kind: sum(1 for layer in shape.layers if layer.kind == kind)
                for kind in ("full", "sliding", "linear")
            },
            "kv_heads": shape.kv_heads,
            "head_dim": shape.head_dim,
            "group_size": group,
            "quantized_kv_start": settings.quantized_kv_start,
            "bytes_per_token": {
                _label(bits, shape): kv.bytes_per_token(shape, bits, group) for bits in bits_list
            },
        },
        "hosts": settings.hosts,
        "prompt_cache": {
            "size": settings.prompt_cache_size,
            "bytes": settings.prompt_cache_bytes,
        },
        "machine": asdict(machine) | {"budget_bytes": budget, "budget": machine.budget_name},
        "contexts": rows,
        "largest_context": largest,
        "model_max_context": shape.max_context,
        "sysctl": sysctl_line(machine, worst["total_bytes"]) if not worst["fits"] else None,
        "verdict": verdict(shape, configured, machine).line if not args.model else None,
        "notes": notes,
        "idle": _idle(cfg.options, worst["total_bytes"]),
    }


IDLE_STAYS = (
    "the server process itself: Python with mlx, mlx-lm and the modules the model needed, "
    "the HTTP server and its threads (about 90 MiB on the CPU build), the disk prompt "
    "cache's index of files, mlx's random keys (8 bytes a thread); the prompt cache files "
    "stay on disk"
)


def _idle(options: dict, held: int) -> dict:
    """What idle_unload gives back when nobody uses the server, and what stays."""
    seconds = options.get("idle_unload")
    return {"idle_unload_seconds": seconds, "given_back_bytes": held, "stays": IDLE_STAYS}


def _idle_line(idle: dict) -> str:
    held = gib(idle["given_back_bytes"])
    if idle["idle_unload_seconds"] is None:
        return (
            f"idle: idle_unload is off, so the model keeps up to {held} while nobody uses it; "
            f'idle_unload = "30m" gives that back after 30 minutes without a request'
        )
    return (
        f"idle: after {idle['idle_unload_seconds']:g} s without a request (idle_unload) the "
        f"weights, KV and prompt caches (up to {held}) are given back; what stays: "
        f"{idle['stays']}"
    )


def _label(bits: int | None, shape: ModelShape) -> str:
    return shape.kv_dtype if bits is None else f"{bits}-bit"


def _plan(args: argparse.Namespace) -> int:
    plan = build(args)
    if args.json:
        print(json.dumps(plan, indent=2))
        return 0
    kv_info = plan["kv_cache"]
    machine = plan["machine"]
    layers = ", ".join(f"{n} {kind}" for kind, n in kv_info["layers"].items() if n)
    console.print(
        f"[bold]{escape(plan['model'])}[/] ({plan['model_type']}): weights "
        f"{gib(plan['weights']['bytes'])} ({plan['weights']['quantization']}); KV cache "
        f"{kv_info['dtype']}, {layers} layers, {kv_info['kv_heads']} KV heads x "
        f"{kv_info['head_dim']}, group size {kv_info['group_size']}",
        highlight=False,
    )
    per_token = ", ".join(f"{k} {v / 1024:.2f} KiB" for k, v in kv_info["bytes_per_token"].items())
    start = kv_info["quantized_kv_start"]
    console.print(
        f"KV bytes per token: {per_token} (quantized once a context reaches {start:,} tokens)",
        highlight=False,
    )
    limit = machine["gpu_limit_bytes"]
    gpu = f"; GPU wired limit {gib(limit)} ({machine['gpu_limit_source']})" if limit else ""
    console.print(
        f"this machine: {gib(machine['physical_bytes'])} physical memory "
        f"({machine['physical_source']}){gpu}",
        highlight=False,
    )
    pc = plan["prompt_cache"]
    cap = f", at most {gib(pc['bytes'])}" if pc["bytes"] else ""
    table = Table(title=f"prompt cache: {pc['size']} entries{cap}", title_justify="left")
    for column in ("context", "KV", "KV cache", "prompt cache", "total", "fits"):
        table.add_column(column, justify="left" if column in ("KV", "fits") else "right")
    for row in plan["contexts"]:
        bits = row["kv_bits"]
        table.add_row(
            f"{row['context']:,}",
            kv_info["dtype"] if bits is None else f"{bits}-bit",
            gib(row["kv_bytes"]),
            gib(row["prompt_cache_bytes"]),
            gib(row["total_bytes"]),
            "[green]yes[/]" if row["fits"] else "[red]no[/]",
        )
    console.print(table)
    longest = ", ".join(f"{k} {v:,}" for k, v in plan["largest_context"].items())
    console.print(
        f"largest context within the {machine['budget']} ({gib(machine['budget_bytes'])}): "
        f"{longest} tokens (the model's maximum: {plan['model_max_context'] or 'unknown'})",
        highlight=False,
    )
    console.print(escape(_idle_line(plan["idle"])), highlight=False)
    for note in plan["notes"]:
        console.print(f"[yellow]note:[/] {escape(note)}", highlight=False)
    if plan["sysctl"]:
        console.print(f"to raise the GPU wired limit: {plan['sysctl']}", highlight=False)
    if plan["verdict"]:
        console.print(escape(plan["verdict"]), highlight=False)
    return 0

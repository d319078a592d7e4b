"""Commands for models: `convert-model`, `models`, `models rm`, `demo-model`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.table import Table

from .. import project
from ..console import console
from ..locking import project_lock
from . import demo_model, listing, planning
from .convert import convert_model


def register(sub: argparse._SubParsersAction) -> None:
    """Add the model commands."""
    _register_convert(sub)
    _register_models(sub)
    _register_demo(sub)


def _register_convert(sub: argparse._SubParsersAction) -> None:
    convert = sub.add_parser(
        "convert-model",
        help="convert Hugging Face weights into a verified, quantized MLX model in local-models/",
        description="Convert a hub id or a local Hugging Face folder with the patched mlx_lm. "
        "The result is built in a temporary folder and moved into local-models/ only once it "
        "loads and generates.",
    )
    convert.add_argument("source", metavar="SOURCE", help="hub id (Qwen/Qwen3-0.6B) or a folder")
    convert.add_argument("--revision", help="hub branch, tag or commit (default: main)")
    quant = convert.add_mutually_exclusive_group()
    quant.add_argument(
        "--bits", type=int, choices=planning.BITS, help="bits per weight (default: 4)"
    )
    quant.add_argument(
        "--recipe", choices=planning.RECIPES, help="mixed-precision recipe, as mlx_lm offers"
    )
    quant.add_argument(
        "--no-quantize",
        dest="quantize",
        action="store_false",
        help="keep the weights unquantized (cast to --dtype)",
    )
    convert.add_argument(
        "--group-size", type=int, choices=planning.GROUP_SIZES, default=64, help="(default: 64)"
    )
    convert.add_argument(
        "--dtype",
        choices=planning.DTYPES,
        help="type of the unquantized weights (default: the model's torch_dtype)",
    )
    convert.add_argument("--name", help="folder name in local-models/ (default: <Model>-MLX-4bit)")
    convert.add_argument("--force", action="store_true", help="replace an existing model")
    convert.add_argument(
        "--dry-run", action="store_true", help="show what would happen and the predicted size"
    )
    convert.set_defaults(handler=_convert)


def _register_models(sub: argparse._SubParsersAction) -> None:
    listing = sub.add_parser("models", help="list the models in local-models/ (or rm one)")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    listing.set_defaults(handler=_list)
    actions = listing.add_subparsers(dest="models_command", metavar="ACTION")
    rm = actions.add_parser("rm", help="delete a model from local-models/")
    rm.add_argument("name", metavar="NAME")
    rm.set_defaults(handler=_remove)


def _register_demo(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser(
        "demo-model",
        help="build the tiny scripted demo model (offline, under a second; says a short script)",
        description="Build the tiny scripted Qwen3 in Hugging Face format (shipped trained "
        "weights and tokenizer, copied offline): it says the script in demo_script.py.",
    )
    demo.add_argument(
        "--dest",
        type=Path,
        help=f"output folder (default: local-models/{demo_model.DEFAULT_NAME})",
    )
    demo.add_argument("--force", action="store_true", help="replace an existing folder")
    demo.set_defaults(handler=_demo_model)


def _quant_text(quantization: dict | None, dtype: str | None) -> str:
    if not quantization:
        return planning.DTYPE_SHORT.get(dtype or "", dtype or "-")
    if quantization.get("recipe"):
        return f"{quantization['recipe']} g{quantization.get('group_size')}"
    return f"{quantization.get('bits')}-bit g{quantization.get('group_size')}"


def _source_text(source: dict | None) -> str:
    if not source:
        return "-"
    if source.get("kind") == "hub":
        return f"{source['repo_id']}@{str(source.get('revision'))[:8]}"
    return str(source.get("path"))


def _convert(args: argparse.Namespace) -> int:

    options = planning.ConvertOptions(
        revision=args.revision,
        bits=args.bits,
        group_size=args.group_size,
        recipe=args.recipe,
        dtype=args.dtype,
        quantize=args.quantize,
        name=args.name,
        force=args.force,
    )
    plan = planning.plan_conversion(args.source, options)
    _print_plan(plan)
    if args.dry_run:
        console.print("[dim]dry run: nothing downloaded or written[/]")
        return 0
    manifest = convert_model(plan)
    verification = manifest["verification"]
    console.print(
        f"[green]converted[/] [bold]{manifest['name']}[/]: {planning.gb(manifest['size_bytes'])} "
        f"in {manifest['convert_seconds']:.1f} s; verified: {verification['generated_tokens']} "
        f"tokens generated ({verification['text']!r})",
        highlight=False,
    )
    console.print(f'use it with: model = "{manifest["name"]}" in config.toml', highlight=False)
    return 0


def _print_plan(plan: planning.Plan) -> None:

    source = plan.source
    if source.kind == "hub":
        where = f"{source.repo_id} @ {source.revision}"
        if source.offline:
            where += " (offline: from the local hub cache)"
    else:
        where = str(source.path)
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_row("source", where)
    table.add_row(
        "architecture", f"{source.model_type} ({planning.gb(source.weight_bytes)} weights)"
    )
    table.add_row("parameters", f"{plan.parameters:,}")
    if source.download_bytes:
        table.add_row("download", planning.gb(source.download_bytes) + " into the hub cache")
    table.add_row("quantization", _quant_text(plan.quantization, plan.dtype))
    output = f"local-models/{plan.name}" + (
        "  [yellow](replaces the existing one)[/]" * plan.replaces
    )
    table.add_row("output", output)
    table.add_row("predicted size", f"about {planning.gb(plan.predicted_bytes)}")
    for entry in plan.disk:
        table.add_row("disk", f"{planning.gb(entry['free'])} free on {entry['where']}")
    table.add_row("mlx_lm", f"{plan.runtime['mlx_lm']} (mlx {plan.runtime['mlx']})")
    console.print(table)


def _list(args: argparse.Namespace) -> int:

    rows = listing.list_models()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        console.print("no models in local-models/ yet; try: convert-model Qwen/Qwen3-0.6B")
        return 0
    table = Table(title="local-models/")
    for column in ("name", "quant", "size", "params", "ctx", "source", "ok"):
        table.add_column(
            column,
            justify="right" if column in ("size", "params") else "left",
            no_wrap=column not in ("quant", "source"),
        )
    for row in rows:
        verified = {True: "[green]yes[/]", False: "[red]no[/]", None: "-"}[row["verified"]]
        table.add_row(
            row["name"],
            _quant_text(row["quantization"], row["dtype"]),
            planning.gb(row["size_bytes"]),
            f"{row['parameters'] / 1e6:.1f}M" if row["parameters"] else "-",
            str(row["context_length"] or "-"),
            _source_text(row["source"]),
            verified,
        )
    console.print(table)
    return 0


def _remove(args: argparse.Namespace) -> int:

    folder = listing.remove_model(args.name)
    console.print(f"removed {folder}", highlight=False)
    return 0


def _demo_model(args: argparse.Namespace) -> int:

    proj = project.current()
    dest = args.dest or proj.models_dir / demo_model.DEFAULT_NAME
    with project_lock(proj.state_dir, "demo-model"):
        path = demo_model.build_demo_model(dest, force=args.force)
    console.print(f"demo model written to [bold]{path}[/]")
    return 0

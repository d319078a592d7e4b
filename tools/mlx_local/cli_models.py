"""Commands for models: `demo-model`."""

from __future__ import annotations

import argparse
from pathlib import Path

from . import demo_model, project
from .locking import project_lock


def register(sub: argparse._SubParsersAction) -> None:
    """Add the model commands."""
    demo = sub.add_parser(
        "demo-model",
        help="build the tiny random-weight demo model (offline, seconds; talks gibberish)",
        description="Build a tiny Qwen3 with random weights and a locally trained tokenizer in "
        "Hugging Face format. It checks the plumbing; it does not say anything sensible.",
    )
    demo.add_argument(
        "--dest",
        type=Path,
        help=f"output folder (default: local-models/{demo_model.DEFAULT_NAME})",
    )
    demo.add_argument("--force", action="store_true", help="replace an existing folder")
    demo.set_defaults(handler=_demo_model)


def _demo_model(args: argparse.Namespace) -> int:
    from .cli import console

    proj = project.current()
    dest = args.dest or proj.models_dir / demo_model.DEFAULT_NAME
    with project_lock(proj.state_dir, "demo-model"):
        path = demo_model.build_demo_model(dest, force=args.force)
    console.print(f"demo model written to [bold]{path}[/]")
    return 0

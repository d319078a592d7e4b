"""mlx-local connect AGENT [--write]: the tested setup of a coding agent for this service
(service/connect.py). Registered by service/cli.py."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from .. import config as config_mod
from .. import project
from ..errors import UserError
from ..plan.model_shape import read_shape
from . import command, connect

err_console = Console(stderr=True, soft_wrap=True, highlight=False)


def register(sub: argparse._SubParsersAction) -> None:
    """Add `connect AGENT [--write]`."""
    parser = sub.add_parser(
        "connect", help="the setup of a coding agent for this service: claude, codex, ..."
    )
    parser.add_argument("agent", choices=connect.AGENTS, help="the agent to set up")
    parser.add_argument(
        "--write",
        action="store_true",
        help="write the agent's config file under your home folder (new or identical only)",
    )
    parser.set_defaults(handler=_connect)


def _connect(args: argparse.Namespace) -> int:
    proj = project.current()
    cfg = config_mod.load(proj)
    target = connect.Target(cfg.host, cfg.port, cfg.served_model_name, _context(cfg, proj))
    setup = connect.setup(args.agent, target)
    if args.write:
        for path in connect.write_files(setup, Path.home()):
            err_console.print(f"wrote {path}")
        err_console.print(f"set {connect.KEY_ENV} to the service's key (any text if it has none)")
        return 0
    print(connect.render(setup), end="")
    return 0


def _context(cfg: config_mod.Config, proj: project.Project) -> int | None:
    """The configured model's context, if it is a local folder that says (else None)."""
    try:
        model = command.resolve_model(cfg.model, proj)
        return read_shape(model.path).max_context if model.path else None
    except (UserError, OSError, ValueError, KeyError):
        return None

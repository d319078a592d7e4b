"""The `mlx-local` command line: parse, call, render. Logic lives in the other modules."""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Callable, Sequence

from rich.console import Console
from rich.markup import escape

from .errors import UserError

console = Console()
err_console = Console(stderr=True)

Handler = Callable[[argparse.Namespace], int | None]


def _command_groups() -> list[Callable[[argparse._SubParsersAction], None]]:
    """Every area's `register(subparsers)`; the only place that knows which commands exist."""
    from . import cli_bench, cli_cluster, cli_models, cli_repo, cli_service

    return [
        cli_repo.register,
        cli_models.register,
        cli_service.register,
        cli_cluster.register,
        cli_bench.register,
    ]


def build_parser() -> argparse.ArgumentParser:
    """The full `mlx-local` parser with every command."""
    parser = argparse.ArgumentParser(
        prog="mlx-local",
        description="A patched mlx-lm kept alive across upstream releases, run as one service.",
    )
    parser.add_argument("--verbose", action="store_true", help="show tracebacks and details")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for register in _command_groups():
        register(sub)
    return parser


def run(argv: Sequence[str] | None, prog_command: str | None = None) -> int:
    """Parse `argv` (prefixed with `prog_command` for the standalone scripts) and run it."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    verbose = "--verbose" in args_list
    if prog_command:
        args_list = [a for a in args_list if a != "--verbose"]
        args_list.insert(0, prog_command)
        if verbose:
            args_list.insert(0, "--verbose")
    parser = build_parser()
    args = parser.parse_args(args_list)
    handler: Handler = args.handler
    try:
        return int(handler(args) or 0)
    except UserError as error:
        err_console.print(
            f"[bold red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True
        )
        return error.exit_code
    except KeyboardInterrupt:
        err_console.print("[bold red]interrupted[/]")
        return 130
    except Exception:  # a bug: show it only when asked
        if args.verbose:
            traceback.print_exc()
        else:
            kind, value, _ = sys.exc_info()
            err_console.print(
                f"[bold red]internal error:[/] {kind.__name__}: {escape(str(value))} "
                "(rerun with --verbose for the traceback)",
                highlight=False,
                soft_wrap=True,
            )
        return 2


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of `mlx-local`."""
    sys.exit(run(argv))


def setup_repo_main() -> None:
    """Entry point of `setup-repo`."""
    sys.exit(run(None, "setup-repo"))


def update_upstream_main() -> None:
    """Entry point of `update-upstream`."""
    sys.exit(run(None, "update-upstream"))


def convert_model_main() -> None:
    """Entry point of `convert-model`."""
    sys.exit(run(None, "convert-model"))


if __name__ == "__main__":  # `python -m mlx_local.cli serve` is what services run
    main()

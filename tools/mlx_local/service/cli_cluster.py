"""`mlx-local cluster check`: is the [distributed] group of the config ready to start?"""

from __future__ import annotations

import argparse

from rich.console import Console

from .. import config as config_mod
from .. import project
from ..errors import UserError
from . import cluster, cluster_check, command, group_disk

console = Console(soft_wrap=True, highlight=False)


def register(sub: argparse._SubParsersAction) -> None:
    """Add the cluster commands."""
    group = sub.add_parser("cluster", help="a model served by several Macs ([distributed])")
    actions = group.add_subparsers(dest="cluster_command", metavar="ACTION", required=True)
    check = actions.add_parser(
        "check", help="every host reachable and alike; print the exact launch command"
    )
    check.set_defaults(handler=_check)


def _size(count: int) -> str:
    return f"{count / 2**30:.1f} GiB" if count >= 2**30 else f"{count / 2**20:.1f} MiB"


def _check(args: argparse.Namespace) -> int:
    proj = project.current()
    cfg = config_mod.load(proj)
    if cfg.distributed is None:
        raise UserError(f"{cfg.path} has no [distributed] table: this is a one-machine setup")
    cfg = group_disk.settle(cfg, proj)
    for note in cfg.notes:
        console.print(f"note: {note}")
    python = project.runtime_python()
    server = command.build_command(cfg, proj, python)
    launch = cluster.launch_command(proj, cfg.distributed, python, server)
    model = launch.argv[launch.argv.index("--model") + 1]
    report = cluster_check.check(proj, cfg.distributed, python, model)
    for item in report.probes:
        facts = item.facts
        if facts is not None:
            weights = "missing" if facts["weights"] is None else _size(facts["weights"])
            console.print(
                f"[green]ok[/] {item.host} ({item.root}): commit {str(facts['commit'])[:12]}, "
                f"queue {facts['queue']}, mlx-lm {facts['mlx_lm']}, mlx {facts['mlx']}, model "
                f"{weights}, memory {_size(facts['memory'])}"
            )
    for problem in report.problems:
        console.print(f"[red]problem:[/] {problem}")
    console.print("launch command:")
    print(launch.display())
    if report.problems:
        raise UserError(f"{len(report.problems)} problem(s); fix them, then run this again")
    console.print(f"[green]ok[/] {cfg.distributed.size} ranks are ready; `mlx-local start`")
    return 0

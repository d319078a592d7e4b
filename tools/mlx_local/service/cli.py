"""Commands for the service: config, serve, start, stop, restart, status, logs, install-service."""

from __future__ import annotations

import argparse
import json
import sys
import tomllib
from dataclasses import asdict
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table

from .. import config as config_mod
from .. import project
from ..atomic import write_atomic
from ..errors import UserError
from ..plan import guard
from ..plan.estimate import Verdict
from ..server_help import server_help
from . import (
    cli_cluster,
    cli_key,
    command,
    control,
    exposure,
    group,
    group_disk,
    install,
    kind,
    kv_check,
    login,
    logs,
    metrics,
    process,
    serve,
)

console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)

STATE_STYLE = {"running": "green", "starting": "yellow", "crashed": "red", "stopped": "dim"}


def register(sub: argparse._SubParsersAction) -> None:
    """Add the service commands (and `cluster check` from cli_cluster, `key` from cli_key)."""
    cli_cluster.register(sub)
    cli_key.register(sub)
    cfg = sub.add_parser("config", help="the settings file: init, path, show, check")
    cfg_sub = cfg.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    init = cfg_sub.add_parser("init", help="create config.toml from the defaults")
    init.add_argument("--force", action="store_true", help="replace an existing config.toml")
    init.set_defaults(handler=_config_init)
    cfg_sub.add_parser("path", help="print the path of config.toml").set_defaults(
        handler=_config_path
    )
    show = cfg_sub.add_parser("show", help="every setting in effect and where it comes from")
    show.set_defaults(handler=_config_show)
    check = cfg_sub.add_parser(
        "check", help="validate the config and print the exact server command line"
    )
    check.add_argument(
        "--no-probe",
        action="store_true",
        help="do not ask the installed server whether it knows every option",
    )
    check.set_defaults(handler=_config_check)

    serve_p = sub.add_parser("serve", help="run the server in the foreground (what services run)")
    _model_options(serve_p)
    serve_p.add_argument(
        "--log", action="store_true", help="write output to the rotating log, not the terminal"
    )
    serve_p.set_defaults(handler=_serve)

    start = sub.add_parser("start", help="start the server in the background, wait for /health")
    _model_options(start)
    start.set_defaults(handler=_start)
    sub.add_parser("stop", help="stop the server gracefully").set_defaults(handler=_stop)
    restart = sub.add_parser("restart", help="stop, then start")
    _model_options(restart)
    restart.set_defaults(handler=_restart)
    status = sub.add_parser("status", help="state, pid, uptime, health, model, memory")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(handler=_status)
    logs_p = sub.add_parser("logs", help="show the server's log")
    logs_p.add_argument("-n", "--lines", type=int, default=50, help="lines to show (default 50)")
    logs_p.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    logs_p.set_defaults(handler=_logs)

    for name, handler, text in (
        ("install-service", _install, "install the launchd agent (macOS) or systemd user unit"),
        ("uninstall-service", _uninstall, "stop and remove the installed service"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument(
            "--dest", type=Path, help=f"folder of the service file (tests; ${install.DIR_ENV})"
        )
        p.add_argument(
            "--kind",
            choices=kind.KINDS,
            default=kind.native_kind(),
            help="launchd or systemd (default: this system's)",
        )
        p.add_argument(
            "--write-only",
            action="store_true",
            help="only write/remove the file; do not call launchctl or systemctl",
        )
        if name == "install-service":
            p.add_argument("--dry-run", action="store_true", help="print the file, change nothing")
        p.set_defaults(handler=handler)


def _model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="serve this model instead of the configured one")
    parser.add_argument(
        "--fallback-demo",
        action="store_true",
        help="if the model is a hub id that cannot be downloaded, serve the demo model instead",
    )


def _load() -> tuple[project.Project, config_mod.Config]:
    proj = project.current()
    if config_mod.ensure_user_config(proj):
        err_console.print(f"created {proj.user_config_file} from the defaults", highlight=False)
    return proj, config_mod.load(proj)


def _config_init(args: argparse.Namespace) -> int:
    proj = project.current()
    if proj.user_config_file.exists() and not args.force:
        raise UserError(f"{proj.user_config_file} already exists; use --force to reset it")
    defaults = config_mod.defaults_file(proj).read_text("utf-8")
    write_atomic(proj.user_config_file, defaults, new_mode=0o600)
    console.print(f"wrote {proj.user_config_file}", highlight=False)
    return 0


def _config_path(args: argparse.Namespace) -> int:
    print(project.current().user_config_file)
    return 0


def _config_show(args: argparse.Namespace) -> int:
    proj, cfg = _load()
    user = tomllib.loads(proj.user_config_file.read_text("utf-8"))
    table = Table(title=str(cfg.path), title_justify="left")
    for column in ("key", "value", "from"):
        table.add_column(column)
    for key, value in cfg.options.items():
        shown = "********" if key == "api_key" else json.dumps(value)
        table.add_row(key, shown, "config.toml" if key in user else "defaults")
    user_service = user.get("service", {})
    for key, value in asdict(cfg.service).items():
        origin = "config.toml" if key in user_service else "defaults"
        table.add_row(f"service.{key}", str(value), origin)
    console.print(table)
    return 0


def _config_check(args: argparse.Namespace) -> int:
    proj, cfg = _load()
    cfg = group_disk.settle(cfg, proj)
    python = project.runtime_python()
    model = command.resolve_model(cfg.model, proj)
    cmd = command.build_command(cfg, proj, python, model)
    warnings = exposure.check(cfg)
    reading = guard.read_model(model)
    kv_check.check_model(cfg, model, reading)
    console.print(f"[green]ok[/] {cfg.path} is valid", highlight=False)
    for note in cfg.notes:
        console.print(f"note: {note}", highlight=False)
    for warning in warnings:
        console.print(f"[yellow]warning:[/] {warning}", highlight=False)
    if model.kind == "hub":
        console.print(f"model: hub id {model.spec} (downloaded on first start)", highlight=False)
    else:
        console.print(f"model: {model.path}", highlight=False)
    _show_verdict(guard.config_verdict(cfg, model, reading), console)
    console.print("server command line:", highlight=False)
    print(cmd.display())
    if args.no_probe:
        return 0
    if not proj.checkout_dir.is_dir():
        console.print("[yellow]not probed:[/] mlx-lm-repo/ does not exist (run setup-repo)")
        return 0
    help_text = server_help(python)
    problem = command.upstream_option_problem(cmd, help_text)
    problem = problem or command.patch_option_problem(cmd, help_text, command.queued_options(proj))
    if problem:
        raise UserError(problem)
    missing = command.unsupported_flags(cmd, help_text)
    if missing:
        raise UserError(
            f"the installed server does not know {', '.join(missing)}: run setup-repo so the "
            "patches that provide them are applied"
        )
    console.print("[green]ok[/] the installed server accepts every option", highlight=False)
    for warning in kv_check.check(cfg, python, model, reading):
        console.print(f"[yellow]warning:[/] {warning}", highlight=False)
    return 0


def _show_verdict(result: Verdict | None, out: Console) -> None:
    """Print the memory plan's one-line verdict, its level in colour."""
    if result is None:
        return
    style = {"fits": "green", "tight": "yellow", "does not fit": "red"}.get(result.level)
    head, found, rest = result.line.partition(result.level)
    if style and found:
        shown = f"{escape(head)}[{style}]{found}[/]{escape(rest)}"
    else:
        shown = escape(result.line)
    out.print(shown, highlight=False, soft_wrap=True)


def _banner(cfg: config_mod.Config, with_key: bool) -> list[str]:
    url = process.base_url(cfg.host, cfg.port)
    return [
        "",
        f"mlx-local is serving model '{cfg.served_model_name}' at {url}/v1",
        "try it:",
        "  " + serve.curl_example(cfg.host, cfg.port, cfg.served_model_name, with_key),
        "",
    ]


def _serve(args: argparse.Namespace) -> int:
    proj, cfg = _load()
    python = project.runtime_python()
    control.check_port(cfg)
    plan = serve.plan(proj, cfg, python, args.model, args.fallback_demo)
    for warning in plan.warnings:
        err_console.print(f"[yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)
    _show_verdict(plan.verdict, err_console)
    err_console.print(f"starting: {plan.command.display()}", highlight=False, soft_wrap=True)
    log = None
    if args.log:
        settings = cfg.service
        max_bytes = settings.log_max_mb * 1024 * 1024
        log = logs.RotatingLog(settings.log_file, max_bytes, settings.log_backups)
    announce = None if args.log else (cfg.host, cfg.port, _banner(cfg, bool(plan.command.env)))
    if cfg.distributed is not None:
        return group.run(proj, cfg, plan.command, log, announce and announce[2])
    serve.exec_server(plan.command, log, announce)
    return 0  # not reached: exec_server replaces this process


def _render_start(outcome: control.Outcome, cfg: config_mod.Config) -> None:
    for warning in outcome.warnings:
        err_console.print(f"[yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)
    _show_verdict(outcome.verdict, err_console)
    pid = f" (pid {outcome.pid})" if outcome.pid else ""
    verb = "already running" if outcome.action == "already-running" else "started"
    console.print(
        f"[green]{verb}[/]{pid} via {outcome.manager}: {outcome.url}/v1, model "
        f"'{cfg.served_model_name}'",
        highlight=False,
    )


def _start(args: argparse.Namespace) -> int:
    proj, cfg = _load()
    outcome = control.start(proj, cfg, project.runtime_python(), args.model, args.fallback_demo)
    _render_start(outcome, cfg)
    return 0


def _render_stop(outcome: control.Outcome) -> None:
    pid = f" (pid {outcome.pid})" if outcome.pid else ""
    messages = {
        "stopped": f"[green]stopped[/]{pid}",
        "killed": f"[yellow]stopped[/]{pid}: it ignored SIGTERM and was killed",
        "not-running": "not running",
        "stale-removed": f"not running; removed the stale pid file of crashed process{pid}",
    }
    console.print(messages[outcome.action], highlight=False)


def _stop(args: argparse.Namespace) -> int:
    proj, cfg = _load()
    outcome = control.stop(proj, cfg)
    _render_stop(outcome)
    if outcome.action == "not-running" and process.healthy(cfg.host, cfg.port):
        url = process.base_url(cfg.host, cfg.port)
        console.print(
            f"note: a server started in a terminal answers at {url}; stop it there with Ctrl-C",
            highlight=False,
        )
    return 0


def _restart(args: argparse.Namespace) -> int:
    proj, cfg = _load()
    python = project.runtime_python()
    installed = install.installed_kind()
    if installed is not None:
        login.check(cfg, installed)  # refuse before stopping
    serve.plan(proj, cfg, python, args.model, args.fallback_demo)
    _render_stop(control.stop(proj, cfg))
    outcome = control.start(proj, cfg, python, args.model, args.fallback_demo)
    _render_start(outcome, cfg)
    return 0


def _duration(seconds: int | None) -> str:
    if seconds is None:
        return "-"
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    text = f"{hours:d}:{minutes:02d}:{secs:02d}"
    return f"{days}d {text}" if days else text


def _status(args: argparse.Namespace) -> int:
    proj, cfg = _load()
    state = control.status(proj, cfg)
    if args.json:
        print(json.dumps(asdict(state), indent=2))
        return 0
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    style = STATE_STYLE.get(state.state, "")
    shown = f"{state.state} ({state.last_exit})" if state.last_exit else state.state
    if state.activity:
        seconds = state.activity_seconds
        shown += f", {state.activity}" + (f" for {_duration(seconds)}" if seconds else "")
    rows = [
        ("state", f"[{style}]{shown}[/]" if style else shown),
        ("managed by", state.manager),
        ("pid", str(state.pid or "-")),
        ("uptime", _duration(state.uptime_seconds)),
        ("address", f"{state.host}:{state.port}"),
        ("base URL", state.url),
        ("health", state.health),
        ("model", state.model),
        ("served id", state.served_model_name),
        ("memory (RSS)", f"{state.rss_bytes / 2**20:.0f} MiB" if state.rss_bytes else "-"),
        ("log", state.log_file),
    ]
    if state.pid_file:
        rows.append(("pid file", state.pid_file))
    if state.detail:
        rows.append(("detail", state.detail))
    rows += metrics.panel_rows(state.metrics, state.metrics_detail)
    rows += [_rank_row(rank) for rank in state.ranks]
    for name, value in rows:
        table.add_row(name, value)
    console.print(Panel(table, title="mlx-local server", expand=False), highlight=False)
    return 0


def _rank_row(rank: dict) -> tuple[str, str]:
    alive = "[green]alive[/]" if rank["alive"] else "[red]down[/]"
    memory = f", {rank['rss_bytes'] / 2**20:.0f} MiB" if rank["rss_bytes"] else ""
    error = f" ({rank['error']})" if rank["error"] else ""
    disk = rank.get("disk")
    if disk is not None:
        disk = (
            f"; disk tier {disk['entries']} entries, {disk['blocks']} blocks, "
            f"{disk['bytes'] / 2**20:.1f} MiB"
        )
    line = f"{rank['host']} pid {rank['pid'] or '-'} {alive}{memory}{disk or ''}{error}"
    return f"rank {rank['rank']}", line


def _logs(args: argparse.Namespace) -> int:
    _, cfg = _load()
    path = cfg.service.log_file
    if not path.exists() and not args.follow:
        raise UserError(f"no log yet at {path}; start the server with `mlx-local start`")
    for line in logs.tail(path, args.lines):
        print(line)
    if args.follow:
        sys.stdout.flush()
        try:
            for line in logs.follow(path):
                print(line, flush=True)
        except KeyboardInterrupt:  # Ctrl-C is how `logs -f` ends
            return 0
    return 0


def _install(args: argparse.Namespace) -> int:
    proj, cfg = _load()
    if args.dry_run:
        path = install.service_file(args.kind, args.dest)
        err_console.print(f"# would write {path}:", highlight=False, soft_wrap=True)
        sys.stdout.write(install.render(args.kind, proj, cfg).decode())
        return 0
    loads = install.will_load(args.kind, args.write_only)
    login.check(cfg, args.kind, key_store=loads)
    if loads:
        stopped = control.stop_process(proj, cfg)
        if stopped.action in ("stopped", "killed"):
            console.print("stopped the background server; the service takes over")
    result = install.install(args.kind, proj, cfg, args.dest)
    what = "wrote" if result.changed else "unchanged:"
    console.print(f"{what} {result.path}", highlight=False)
    if not loads:
        return 0
    python = project.runtime_python()
    outcome = control.start_service(
        args.kind, proj, cfg, python, reload=result.changed, path=result.path
    )
    for warning in outcome.warnings:
        err_console.print(f"[yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)
    if outcome.action == "already-running":
        console.print(f"already running (pid {outcome.pid}) via {args.kind}, left alone")
    else:
        console.print(
            f"[green]installed[/] and started (pid {outcome.pid}) via {args.kind}: "
            f"{outcome.url}/v1; see `mlx-local status`",
            highlight=False,
        )
    return 0


def _uninstall(args: argparse.Namespace) -> int:
    _, cfg = _load()
    removed = install.uninstall(args.kind, cfg, args.dest, args.write_only)
    if removed is None:
        console.print("not installed; nothing to do")
    else:
        console.print(f"[green]removed[/] {removed}", highlight=False)
    return 0

"""start / stop / status: through launchd or systemd when installed, else a pid-file process."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .. import processes
from ..config import Config
from ..errors import UserError
from ..plan.estimate import Verdict
from ..project import PYTHON_ENV, ROOT_ENV, Project
from . import cluster, group_disk, install, login, logs, process, systemctl, systemd
from . import metrics as metrics_mod
from .command import resolve_model
from .kind import Kind
from .managed import ServiceState, describe_exit
from .serve import plan

LOG_LINES_ON_FAILURE = 20
POLL = 0.5


@dataclass(frozen=True)
class Outcome:
    """What start or stop did, for the CLI to render."""

    action: str  # started, already-running, stopped, not-running, stale-removed
    manager: str  # process, systemd, launchd
    pid: int | None = None
    url: str | None = None
    warnings: tuple[str, ...] = ()
    verdict: Verdict | None = None  # the memory plan's verdict for what was started


def _tail(path: Path, label: str = "") -> str:
    lines = logs.tail(path, LOG_LINES_ON_FAILURE)
    shown = "\n".join(f"  {line}" for line in lines) or "  (the log is empty)"
    return f"last lines of {path}{label}:\n{shown}"


def _failure(message: str, config: Config) -> UserError:
    path = config.service.log_file
    if not logs.tail(path, 1) and logs.tail(config.service.log_dir / "service.log", 1):
        path = config.service.log_dir / "service.log"
    return UserError(f"{message}; {_tail(path)}")


def check_port(config: Config) -> None:
    """Fail with one line when something already listens on the configured port."""
    if process.healthy(config.host, config.port):
        raise UserError(
            f"a server not started by `mlx-local start` already answers at "
            f"{process.base_url(config.host, config.port)} (a terminal running `make run` or "
            "`mlx-local serve`?); stop it with Ctrl-C there, or set another port"
        )
    if process.port_in_use(config.host, config.port):
        raise UserError(
            f"port {config.port} on {config.host} is already in use by another program; "
            f"stop it or set another port in {config.path}"
        )


def serve_args(project: Project, model_override: str | None, fallback_demo: bool) -> list[str]:
    """What start/restart pass on to `serve` in the service: the model (resolved: a path or a
    hub id, whatever folder the service runs in) and --fallback-demo."""
    args = ["--model", resolve_model(model_override, project).argument] if model_override else []
    return args + (["--fallback-demo"] if fallback_demo else [])


def _installed_model(kind: Kind) -> str | None:
    """The --model that start/restart wrote into the installed service, if any."""
    program = install.installed_program(kind)
    return program[program.index("--model") + 1] if "--model" in program[:-1] else None


def _refuse_another_model(project: Project, current: str, requested: str | None) -> None:
    """`start --model X` while another model is served: say how to switch."""
    if requested is None:
        return
    wanted = resolve_model(requested, project)
    if str(wanted.path or wanted.spec) != current:
        raise UserError(
            f"already running {current}; to serve {requested} instead: "
            f"mlx-local restart --model {requested}"
        )


def _ended(status: int) -> str:
    return f"exited with code {status}" if status >= 0 else f"was {describe_exit(status)}"


def _service_failed(kind: Kind, current: ServiceState | None, config: Config) -> UserError:
    """The service died during startup: stop it (so that it does not crash-loop unseen) and
    say why, with the server's log and the service manager's (StandardErrorPath, journal)."""
    driver = install.driver(kind)
    driver.stop(config.service.stop_timeout, config.host, config.port)
    status = current.last_exit if current else None
    what = "was unloaded" if status is None else _ended(status)
    what += " during startup"
    if status:
        what += (
            f"; {kind} restarts it every {driver.RESTART_EVERY} s after a failure: a crash loop, "
            "not a slow start"
        )
    blocks = [_tail(config.service.log_file)]
    blocks.append(_tail(config.service.log_dir / "service.log", f" (the {kind} service's output)"))
    if kind == "systemd" and (journal := systemctl.journal_tail(LOG_LINES_ON_FAILURE)):
        blocks.append("the journal:\n" + "\n".join(f"  {line}" for line in journal))
    return UserError(
        f"the {kind} service {what}; stopped it (fix the cause, then `mlx-local start`)\n"
        + "\n".join(blocks)
    )


def _wait_started(kind: Kind, before: int, config: Config) -> int | None:
    """Wait for /health; a service whose process ended (or was replaced) fails at once."""
    driver = install.driver(kind)
    deadline = time.monotonic() + config.service.start_timeout
    while True:
        current = driver.state()
        if process.healthy(config.host, config.port):
            return current.pid if current else None
        started = current.runs - before if current else 0
        if current is None or started > 1 or (started == 1 and current.pid is None):
            raise _service_failed(kind, current, config)
        if time.monotonic() > deadline:
            raise UserError(
                f"the {kind} service did not answer /health within "
                f"{config.service.start_timeout:g}s; it is still starting (pid {current.pid}), "
                "which a large model can take: `mlx-local status`, `mlx-local logs -f`; "
                + _tail(config.service.log_file)
            )
        time.sleep(POLL)


def start_service(
    kind: Kind,
    project: Project,
    config: Config,
    python: Path,
    model_override: str | None = None,
    fallback_demo: bool = False,
    reload: bool = False,
    path: Path | None = None,
) -> Outcome:
    """Start the installed service (its file at `path`, else the usual place) on what the
    config and the overrides say; `reload`: the file changed, so a loaded service is loaded
    again. A running one is left alone."""
    login.check(config, kind)
    url = process.base_url(config.host, config.port)
    running = install.driver(kind).state()
    running = running if running is not None and running.pid is not None else None
    if process.healthy(config.host, config.port) and not reload:
        current = _installed_model(kind) or str(
            resolve_model(config.model, project).path or config.model
        )
        _refuse_another_model(project, current, model_override)
        return Outcome("already-running", kind, running.pid if running else None, url)
    if running is None:
        check_port(config)  # the port is free, or someone else's
    server = plan(project, config, python, model_override, fallback_demo)
    path = path or install.service_file(kind)
    content = install.render(
        kind, project, config, serve_args(project, model_override, fallback_demo)
    )
    changed = install.write(path, content) or reload
    project.state_dir.mkdir(parents=True, exist_ok=True)  # systemd records each exit there
    settings = config.service
    before = install.driver(kind).start(
        path, changed, settings.stop_timeout, config.host, config.port
    )
    pid = _wait_started(kind, before, config)
    return Outcome("started", kind, pid, url, tuple(server.warnings), server.verdict)


def start(
    project: Project,
    config: Config,
    python: Path,
    model_override: str | None = None,
    fallback_demo: bool = False,
) -> Outcome:
    """Start the server and wait until /health answers."""
    url = process.base_url(config.host, config.port)
    kind = install.installed_kind()
    if kind is not None:
        return start_service(kind, project, config, python, model_override, fallback_demo)
    pid_file = process.PidFile(project.state_dir)
    record = pid_file.read()
    if record is not None:
        if process.is_server(processes.process_info(record.pid)):
            _refuse_another_model(project, record.model, model_override)
            return Outcome("already-running", "process", record.pid, url)
        pid_file.remove()
    check_port(config)
    server = plan(project, config, python, model_override, fallback_demo)
    log_file = config.service.log_file
    argv = [sys.executable, "-m", "mlx_local.cli", "serve", "--log", "--model"]
    argv.append(server.command.model.argument)
    env = {**os.environ, ROOT_ENV: str(project.root), PYTHON_ENV: str(python)}
    child = process.spawn(argv, env, project.root, log_file)
    model = server.command.model
    pid_file.write(
        process.Record(
            pid=child.pid,
            host=config.host,
            port=config.port,
            model=str(model.path or model.spec),
            served_model_name=config.served_model_name,
            log_file=str(log_file),
            started_at=time.time(),
        )
    )
    alive = lambda: child.poll() is None  # noqa: E731
    if process.wait_healthy(config.host, config.port, config.service.start_timeout, alive):
        return Outcome("started", "process", child.pid, url, tuple(server.warnings), server.verdict)
    if child.poll() is None:
        processes.terminate(child.pid, config.service.stop_timeout)
        message = f"the server did not answer /health within {config.service.start_timeout:g}s"
    else:
        message = f"the server exited during startup (exit code {child.returncode})"
    child.wait()
    pid_file.remove()
    raise _failure(message, config)


def stop(project: Project, config: Config) -> Outcome:
    """Stop the server gracefully; it stays stopped. A group: every rank on every host too."""
    outcome = _stop(project, config)
    if config.distributed is not None:
        rank_list = cluster.ranks(project, config.distributed)
        left = cluster.stop_ranks(rank_list, config.service.stop_timeout)
        unsure = [state for state in left if state.alive or state.error]
        if unsure:
            raise UserError(
                "not stopped for sure: "
                + "; ".join(
                    f"rank {s.rank} on {s.host} ({s.error or f'pid {s.pid} alive'})" for s in unsure
                )
                + "; run `mlx-local stop` again, or stop them on their hosts"
            )
        cluster.key_file(project).unlink(missing_ok=True)
    return outcome


def _stop(project: Project, config: Config) -> Outcome:
    kind = install.installed_kind()
    if kind is None:
        return stop_process(project, config)
    before = install.driver(kind).stop(config.service.stop_timeout, config.host, config.port)
    return Outcome("stopped" if before else "not-running", kind, before.pid if before else None)


def stop_process(project: Project, config: Config) -> Outcome:
    """Stop the background server `start` launched without a service (the pid file's)."""
    pid_file = process.PidFile(project.state_dir)
    record = pid_file.read()
    if record is None:
        return Outcome("not-running", "process")
    if not process.is_server(processes.process_info(record.pid)):
        pid_file.remove()
        return Outcome("stale-removed", "process", record.pid)
    how = processes.terminate(record.pid, config.service.stop_timeout)
    pid_file.remove()
    return Outcome("killed" if how == "killed" else "stopped", "process", record.pid)


@dataclass(frozen=True)
class Status:
    """Everything `status` shows."""

    state: str  # running, starting, crashed, stopped
    manager: str  # process, systemd, launchd, foreground (a server we did not start)
    pid: int | None
    uptime_seconds: int | None
    host: str
    port: int
    url: str
    health: str  # ok, down
    model: str
    served_model_name: str
    rss_bytes: int | None
    pid_file: str | None
    log_file: str
    detail: str = ""
    last_exit: str | None = None  # how the last run ended (a service): "exited 0", ...
    metrics: metrics_mod.Summary | None = None  # from GET /metrics when the server answers
    metrics_detail: str = ""  # why there are no metrics
    activity: str | None = None  # "idle (model unloaded)" and the like (--idle-unload)
    activity_seconds: int | None = None  # for how long
    ranks: list[dict] = field(default_factory=list)  # a [distributed] group: each rank


def _service_status(kind: Kind, project: Project) -> tuple[str, int | None, str | None, str]:
    """state, pid, last exit, detail of an installed service, from its manager."""
    driver = install.driver(kind)
    current = driver.state()
    if current is None and kind == "systemd":  # an unloaded unit: its ExecStopPost= record
        recorded = systemctl.recorded_exit(project.state_dir / systemd.EXIT_FILE)
        current = ServiceState(None, 0, recorded, False) if recorded is not None else None
    ended = describe_exit(current.last_exit) if current and current.last_exit is not None else None
    if current is not None and current.pid is not None:
        return "running", current.pid, None, ""
    if not driver.enabled():
        stays = "stopped by `mlx-local stop`: it stays stopped at login until `mlx-local start`"
        return "stopped", None, ended, stays
    if current is None or current.last_exit in (None, 0):
        return "stopped", None, ended, ""
    if current.restarting:
        again = f"{ended}; {kind} restarts it in up to {driver.RESTART_EVERY} s"
        return "crashed", None, ended, again
    return "crashed", None, ended, f"{ended}; {kind} does not restart it (`mlx-local start`)"


def status(project: Project, config: Config) -> Status:
    """The server's state as seen from outside (pid file or service manager, and /health)."""
    kind = install.installed_kind()
    pid_file = process.PidFile(project.state_dir)
    record = pid_file.read() if kind is None else None
    host = record.host if record and record.host else config.host
    port = record.port if record and record.port else config.port
    is_healthy = process.healthy(host, port)
    detail = ""
    last_exit = None
    model = record.model if record and record.model else config.model
    if kind is not None:
        state, pid, last_exit, detail = _service_status(kind, project)
        model = _installed_model(kind) or model
    elif record is not None:
        pid = record.pid
        alive = process.is_server(processes.process_info(pid))
        state = "running" if alive else "crashed"
        if not alive:
            detail = f"process {pid} is gone but its pid file {pid_file.path} remains (stale)"
    else:
        pid = None
        state = "running" if is_healthy else "stopped"
        if is_healthy:
            detail = "a server answers on this port but was not started by `mlx-local start`"
    manager = kind or ("process" if record is not None or not is_healthy else "foreground")
    if state == "running" and not is_healthy:
        state = "starting"
    info = processes.process_info(pid) if pid else None
    summary, why = metrics_mod.read(config, host, port) if is_healthy else (None, "")
    return Status(
        state=state,
        manager=manager,
        pid=pid,
        uptime_seconds=info.uptime_seconds if info else None,
        host=host,
        port=port,
        url=process.base_url(host, port) + "/v1",
        health="ok" if is_healthy else "down",
        model=model,
        served_model_name=(
            record.served_model_name
            if record and record.served_model_name
            else config.served_model_name
        ),
        rss_bytes=info.rss_bytes if info else None,
        pid_file=str(pid_file.path) if kind is None else None,
        log_file=str(config.service.log_file),
        detail=detail,
        last_exit=last_exit,
        metrics=summary,
        metrics_detail=why,
        activity=summary.activity if summary else None,
        activity_seconds=(
            max(int(time.time() - summary.model_state_since), 0)
            if summary and summary.activity and summary.model_state_since is not None
            else None
        ),
        ranks=_ranks(project, config) if config.distributed is not None else [],
    )


def _ranks(project: Project, config: Config) -> list[dict]:
    """Each rank of a group: host, pid, alive, memory, and its disk tier (None: off)."""
    states = cluster.signal_ranks(cluster.ranks(project, config.distributed))
    keeps = group_disk.server_keeps_ranks(project)
    disk = group_disk.usage(project, config) if keeps else {}
    return [{**asdict(state), "disk": _asdict(disk.get(state.rank))} for state in states]


def _asdict(value: object) -> dict | None:
    return asdict(value) if value is not None else None

"""start / stop / status: through launchd or systemd when installed, else a pid-file process."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from .. import processes
from ..config import Config
from ..errors import UserError
from ..plan.estimate import Verdict
from ..project import PYTHON_ENV, ROOT_ENV, Project
from . import cluster, install, launchd, logs, process, systemd
from . import metrics as metrics_mod
from .serve import plan

LOG_LINES_ON_FAILURE = 20


@dataclass(frozen=True)
class Outcome:
    """What start or stop did, for the CLI to render."""

    action: str  # started, already-running, stopped, not-running, stale-removed
    manager: str  # process, systemd, launchd
    pid: int | None = None
    url: str | None = None
    warnings: tuple[str, ...] = ()
    verdict: Verdict | None = None  # the memory plan's verdict for what was started


def _failure(message: str, config: Config) -> UserError:
    lines = logs.tail(config.service.log_file, LOG_LINES_ON_FAILURE)
    if not lines:
        lines = logs.tail(config.service.log_dir / "service.log", LOG_LINES_ON_FAILURE)
    shown = "\n".join(f"  {line}" for line in lines) or "  (the log is empty)"
    return UserError(f"{message}; last lines of {config.service.log_file}:\n{shown}")


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


def _service_start(kind: str, project: Project, config: Config) -> Outcome:
    if kind == "launchd":
        launchd.start(install.service_file("launchd"))
        alive = lambda: launchd.info() is not None  # noqa: E731
    else:
        systemd.start()
        alive = lambda: systemd.show().get("ActiveState") in ("active", "activating")  # noqa: E731
    if not process.wait_healthy(config.host, config.port, config.service.start_timeout, alive):
        raise _failure(f"the {kind} service did not become healthy", config)
    pid = launchd.pid() if kind == "launchd" else systemd.pid()
    return Outcome("started", kind, pid, process.base_url(config.host, config.port))


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
        if process.healthy(config.host, config.port):
            return Outcome("already-running", kind, url=url)
        check_port(config)
        server = plan(project, config, python)
        outcome = _service_start(kind, project, config)
        return replace(outcome, warnings=tuple(server.warnings), verdict=server.verdict)
    pid_file = process.PidFile(project.state_dir)
    record = pid_file.read()
    if record is not None:
        if process.is_server(processes.process_info(record.pid)):
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
    if kind == "launchd":
        pid = launchd.pid()
        return Outcome("stopped" if launchd.stop() else "not-running", kind, pid)
    if kind == "systemd":
        pid = systemd.pid()
        return Outcome("stopped" if systemd.stop() else "not-running", kind, pid)
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
    metrics: metrics_mod.Summary | None = None  # from GET /metrics when the server answers
    metrics_detail: str = ""  # why there are no metrics
    ranks: list[dict] = field(default_factory=list)  # a [distributed] group: each rank


def status(project: Project, config: Config) -> Status:
    """The server's state as seen from outside (pid file or service manager, and /health)."""
    kind = install.installed_kind()
    pid_file = process.PidFile(project.state_dir)
    record = pid_file.read() if kind is None else None
    host = record.host if record and record.host else config.host
    port = record.port if record and record.port else config.port
    is_healthy = process.healthy(host, port)
    detail = ""
    if kind == "launchd":
        data = launchd.info()
        pid = launchd.pid()
        state = "stopped" if data is None else ("running" if pid else "crashed")
        detail = "" if data is None else f"last exit code {data.get('last exit code', '?')}"
    elif kind == "systemd":
        data = systemd.show()
        pid = systemd.pid()
        active = data.get("ActiveState", "")
        crashed = active == "failed" or data.get("SubState") == "auto-restart"
        state = "crashed" if crashed else "running" if active == "active" else "stopped"
        detail = f"{active}/{data.get('SubState', '')} result={data.get('Result', '')}"
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
        model=(record.model if record and record.model else config.model),
        served_model_name=(
            record.served_model_name
            if record and record.served_model_name
            else config.served_model_name
        ),
        rss_bytes=info.rss_bytes if info else None,
        pid_file=str(pid_file.path) if kind is None else None,
        log_file=str(config.service.log_file),
        detail=detail,
        metrics=summary,
        metrics_detail=why,
        ranks=[
            asdict(rank)
            for rank in cluster.signal_ranks(cluster.ranks(project, config.distributed))
        ]
        if config.distributed is not None
        else [],
    )

"""Driving the systemd user unit with `systemctl --user`: start, stop, state, the journal.

`stop` disables the unit as well as stopping it, so that a stopped server stays stopped at the
next login (default.target no longer wants it), like `launchctl disable` on macOS; `start`
enables it again.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

from ..errors import UserError
from . import process
from .managed import ServiceState
from .systemd import RESTART_SECONDS, UNIT

RESTART_EVERY = RESTART_SECONDS
POLL = 0.2
PORT_WAIT_SECONDS = 10.0
# systemd's si_code of the main process's end (ExecMainCode): exited, killed, dumped core.
CLD_EXITED = "1"


def _systemctl(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    try:
        result = subprocess.run(
            ["systemctl", "--user", *args], capture_output=True, text=True, timeout=120
        )
    except FileNotFoundError:
        raise UserError("systemctl is not installed; cannot manage a systemd user unit") from None
    if check and result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().replace("\n", " ")
        raise UserError(f"systemctl --user {' '.join(args)} failed: {detail}")
    return result


def bus_available() -> bool:
    """Whether a user systemd instance answers (`systemctl --user` can work)."""
    try:
        return _systemctl("show-environment", check=False).returncode == 0
    except UserError:
        return False


def no_bus_message() -> str:
    return (
        "no systemd user instance is reachable (systemctl --user cannot connect to the bus; "
        "log in through a normal session or run `loginctl enable-linger $USER`)"
    )


def show() -> dict[str, str]:
    """The unit's properties that say how it runs and how it last ended."""
    properties = "LoadState,ActiveState,SubState,MainPID,NRestarts,ExecMainCode,ExecMainStatus"
    properties += ",UnitFileState,NeedDaemonReload"
    result = _systemctl("show", UNIT, "-p", properties, check=False)
    pairs = (line.partition("=") for line in result.stdout.splitlines())
    return {key: value for key, _, value in pairs}


def state() -> ServiceState | None:
    """The unit as systemd sees it; None when systemd has no such unit or it never ran."""
    data = show()
    if data.get("LoadState") != "loaded":
        return None
    code, status = data.get("ExecMainCode", "0"), data.get("ExecMainStatus", "0")
    last_exit = None
    if code != "0" and status.lstrip("-").isdigit():
        last_exit = int(status) if code == CLD_EXITED else -int(status)
    pid = data.get("MainPID", "0")
    active = data.get("ActiveState") in ("active", "activating", "deactivating", "reloading")
    if not active and last_exit is None:
        return None
    restarts = data.get("NRestarts", "0")
    return ServiceState(
        pid=int(pid) if pid.isdigit() and pid != "0" else None,
        runs=1 + (int(restarts) if restarts.isdigit() else 0),
        last_exit=last_exit,
        restarting=data.get("SubState") == "auto-restart",
    )


def recorded_exit(path: Path) -> int | None:
    """How the last run ended as ExecStopPost= wrote it ("exited 0", "dumped ABRT"): for a
    unit systemd has unloaded since, which forgot it. None when there is no record."""
    try:
        code, _, status = path.read_text().strip().partition(" ")
    except OSError:
        return None
    if code == "exited" and status.isdigit():
        return int(status)
    try:
        return -signal.Signals[f"SIG{status}"].value
    except KeyError:
        return None


def enabled() -> bool:
    """Whether the unit starts at login (`systemctl --user enable`)."""
    return show().get("UnitFileState") == "enabled"


def start(unit: Path, reload: bool, stop_timeout: float, host: str, port: int) -> int:
    """Enable the unit and start it (restart it if `reload` and it runs). Returns its run count
    before this start: 0 from a stopped unit (systemd resets NRestarts), one less than now for
    a running one (the run under way is this start's)."""
    if reload or show().get("NeedDaemonReload") == "yes":
        _systemctl("daemon-reload")
    _systemctl("enable", UNIT)
    current = state()
    running = current is not None and current.pid is not None
    _systemctl("restart" if reload and running else "start", UNIT)
    return current.runs - 1 if running and not reload else 0


def stop(stop_timeout: float, host: str, port: int, disable: bool = True) -> ServiceState | None:
    """Stop the unit (SIGTERM, SIGKILL after TimeoutStopSec: systemctl waits) and wait for the
    port; `disable` keeps it stopped at the next login. Returns its state before (None: it
    was not running)."""
    if disable:
        _systemctl("disable", UNIT, check=False)
    current = state()
    if current is not None and current.pid is None and not current.restarting:
        current = None  # it had ended already
    _systemctl("stop", UNIT, check=False)
    # A server that dies badly on SIGTERM leaves the unit "failed": this stop was asked for.
    _systemctl("reset-failed", UNIT, check=False)
    deadline = time.monotonic() + PORT_WAIT_SECONDS
    while process.port_in_use(host, port):
        if time.monotonic() > deadline:
            raise UserError(
                f"port {port} is still bound {PORT_WAIT_SECONDS:g}s after systemd stopped "
                f"{UNIT}; run `mlx-local stop` again"
            )
        time.sleep(POLL)
    return current


def forget() -> None:
    """After the unit file is gone: let systemd forget the unit."""
    _systemctl("daemon-reload", check=False)


def journal_tail(lines: int) -> list[str]:
    """The unit's last journal lines (systemd's own messages about it), if there is a journal."""
    try:
        result = subprocess.run(
            ["journalctl", "--user", "-u", UNIT, "-n", str(lines), "--no-pager", "-q"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    if result.returncode != 0:
        return []
    return [line for line in result.stdout.splitlines() if line.strip()]

"""Driving the LaunchAgent with launchctl(1): load, start, stop, and wait until launchd has let
go of it.

What real Macs do and this module allows for (see tests/standin/launchd.py for the sources):
`bootout` returns right after SIGTERM while launchd keeps the label for a cleanup window of
about 5 s; a `bootstrap` meanwhile fails with 5 (Input/output error), as does one of a disabled
service, and one of a loaded service with 37. `kickstart -k` kills with SIGKILL, so a restart
here is bootout (SIGTERM, then SIGKILL after ExitTimeOut), wait, bootstrap.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

from .. import processes
from ..errors import UserError
from . import process
from .launchd import LABEL, THROTTLE_SECONDS
from .managed import ServiceState

RETRIED_CODES = (5, 37)  # still being removed or disabled; already loaded / in progress
BOOTSTRAP_RETRY_SECONDS = 10.0
CLEANUP_SECONDS = 10.0  # launchd's cleanup window after SIGTERM (about 5 s), with a margin
NOT_FOUND = 113  # Could not find specified service
POLL = 0.2
RESTART_EVERY = THROTTLE_SECONDS


def domain() -> str:
    return f"gui/{os.getuid()}"


def target() -> str:
    return f"{domain()}/{LABEL}"


def _launchctl(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    try:
        result = subprocess.run(["launchctl", *args], capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise UserError("launchctl is not installed; cannot manage a LaunchAgent") from None
    if check and result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().replace("\n", " ")
        raise UserError(f"launchctl {' '.join(args)} failed: {detail}")
    return result


def _fields(text: str) -> dict[str, str]:
    """The top-level `key = value` lines of `launchctl print` (nested blocks are indented
    further and left out; the first of a key wins)."""
    found: dict[str, str] = {}
    for key, value in re.findall(r"^\t([a-z][a-z ]*?) = (.*)$", text, flags=re.MULTILINE):
        found.setdefault(key, value.strip())
    return found


def _last_exit(fields: dict[str, str]) -> int | None:
    signal_text = fields.get("last terminating signal", "")
    if match := re.search(r"(\d+)$", signal_text):
        return -int(match.group(1))
    if match := re.match(r"-?\d+", fields.get("last exit code", "")):
        return int(match.group(0))
    return None  # "(never exited)"


def state() -> ServiceState | None:
    """The job as `launchctl print` shows it; None when launchd does not know it."""
    result = _launchctl("print", target(), check=False)
    if result.returncode != 0:
        return None
    fields = _fields(result.stdout)
    pid = fields.get("pid", "")
    runs = fields.get("runs", "0")
    return ServiceState(
        pid=int(pid) if pid.isdigit() else None,
        runs=int(runs) if runs.isdigit() else 0,
        last_exit=_last_exit(fields),
        restarting=fields.get("state") == "spawn scheduled",
    )


def enabled() -> bool:
    """False once `launchctl disable` marked the job (launchd keeps that across boots)."""
    result = _launchctl("print-disabled", domain(), check=False)
    return not re.search(rf'"{re.escape(LABEL)}" => (disabled|true)', result.stdout)


def _bootstrap(plist: Path) -> None:
    """Load the job, retrying while launchd is still removing the previous one."""
    deadline = time.monotonic() + BOOTSTRAP_RETRY_SECONDS
    while True:
        result = _launchctl("bootstrap", domain(), str(plist), check=False)
        if result.returncode == 0:
            return
        if result.returncode == 37 and state() is not None:
            return  # loaded after all (by a login, or a parallel command)
        if result.returncode not in RETRIED_CODES or time.monotonic() > deadline:
            detail = (result.stderr or result.stdout).strip().replace("\n", " ")
            raise UserError(
                f"launchctl bootstrap {domain()} {plist} failed: {detail}; run `mlx-local "
                "start` again in a few seconds, or see `log show --last 2m --predicate "
                "'process == \"launchd\"'`"
            )
        time.sleep(0.5)


def start(plist: Path, reload: bool, stop_timeout: float, host: str, port: int) -> int:
    """Make the job run `plist`: enable it, load it (a loaded one again if `reload`), or
    start it if it is loaded but not running. Returns its run count before: the runs after
    it are this start's."""
    _launchctl("enable", target())
    current = state()
    if current is not None and reload:
        stop(stop_timeout, host, port, disable=False)
        current = None
    if current is None:
        _bootstrap(plist)
        return 0
    if current.pid is not None:
        return current.runs - 1  # the run under way is this start's
    _launchctl("kickstart", target())
    return current.runs


def stop(stop_timeout: float, host: str, port: int, disable: bool = True) -> ServiceState | None:
    """Stop the job and wait until launchd has let go of it: pid gone, `launchctl print`
    answers "unknown", the port free. `disable` keeps it stopped across logins. Returns the
    job's state before (None: it was not loaded)."""
    if disable:
        _launchctl("disable", target())
    current = state()
    if current is None:
        return None
    result = _launchctl("bootout", target(), check=False)
    if result.returncode not in (0, NOT_FOUND):
        detail = (result.stderr or result.stdout).strip()
        raise UserError(f"launchctl bootout {target()} failed: {detail}")
    wait_released(current.pid, stop_timeout, host, port)
    return current


def forget() -> None:
    """After the plist is gone: drop the disabled mark `stop` left in launchd's overrides."""
    _launchctl("enable", target(), check=False)


def wait_released(pid: int | None, stop_timeout: float, host: str, port: int) -> None:
    """Wait (at most the exit timeout and launchd's cleanup window) until the job is gone."""
    limit = max(1.0, stop_timeout) + CLEANUP_SECONDS
    deadline = time.monotonic() + limit
    while True:
        alive = pid is not None and process.is_server(processes.process_info(pid))
        known = state() is not None
        bound = process.port_in_use(host, port)
        if not (alive or known or bound):
            return
        if time.monotonic() > deadline:
            holds = [f"pid {pid} still runs"] if alive else []
            holds += ["launchctl print still lists it"] if known else []
            holds += [f"port {port} is still bound"] if bound else []
            raise UserError(
                f"launchd has not let go of {LABEL} after {limit:g}s "
                f"({', '.join(holds)}); run `mlx-local stop` again"
            )
        time.sleep(POLL)

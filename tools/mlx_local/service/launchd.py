"""macOS: the LaunchAgent plist, and loading it with launchctl (bootstrap/bootout/kickstart)."""

from __future__ import annotations

import os
import plistlib
import re
import subprocess
from pathlib import Path

from ..errors import UserError
from .unitenv import ServiceSpec

LABEL = "com.local.mlx-local"
THROTTLE_SECONDS = 30


def default_dir() -> Path:
    """Where per-user LaunchAgents live."""
    return Path.home() / "Library" / "LaunchAgents"


def file_name() -> str:
    return f"{LABEL}.plist"


def build(spec: ServiceSpec) -> dict:
    """The LaunchAgent as a dict (see launchd.plist(5))."""
    return {
        "Label": LABEL,
        "ProgramArguments": [str(part) for part in spec.program],
        "WorkingDirectory": str(spec.working_dir),
        "EnvironmentVariables": dict(spec.environment),
        "RunAtLoad": True,
        # Restart after a crash (non-zero exit or a signal), not after a clean exit.
        "KeepAlive": {"SuccessfulExit": False},
        "ThrottleInterval": THROTTLE_SECONDS,
        # Interactive: no CPU/IO throttling (app-like limits); a served model must stay
        # responsive. Disk I/O at normal priority, so loading gigabytes of weights is not slowed.
        "ProcessType": "Interactive",
        "LowPriorityIO": False,
        "LowPriorityBackgroundIO": False,
        # Seconds launchd waits between SIGTERM and SIGKILL.
        "ExitTimeOut": int(spec.stop_timeout),
        "StandardOutPath": str(spec.output_log),
        "StandardErrorPath": str(spec.output_log),
    }


def render(spec: ServiceSpec) -> bytes:
    """The plist file's bytes (XML)."""
    return plistlib.dumps(build(spec), sort_keys=False)


def _domain() -> str:
    return f"gui/{os.getuid()}"


def _launchctl(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["launchctl", *args], capture_output=True, text=True, timeout=60)
    if check and result.returncode != 0:
        detail = (result.stderr or result.stdout).strip()
        raise UserError(f"launchctl {' '.join(args)} failed: {detail}")
    return result


def info() -> dict[str, str] | None:
    """`launchctl print` of the job as key -> value (None when it is not loaded)."""
    result = _launchctl("print", f"{_domain()}/{LABEL}", check=False)
    if result.returncode != 0:
        return None
    pairs = re.findall(r"^\s*([a-z][a-z ]*?) = (.*)$", result.stdout, flags=re.MULTILINE)
    return {key: value.strip() for key, value in pairs}


def pid() -> int | None:
    """The running job's pid, if any."""
    data = info() or {}
    return int(data["pid"]) if data.get("pid", "").isdigit() else None


def start(plist: Path) -> None:
    """Load the job (RunAtLoad starts it) or, if loaded, start it now."""
    _launchctl("enable", f"{_domain()}/{LABEL}", check=False)
    if info() is None:
        _launchctl("bootstrap", _domain(), str(plist))
    else:
        _launchctl("kickstart", f"{_domain()}/{LABEL}")


def stop() -> bool:
    """Unload the job, which stops it and keeps it stopped (False if it was not loaded)."""
    if info() is None:
        return False
    _launchctl("bootout", f"{_domain()}/{LABEL}")
    return True

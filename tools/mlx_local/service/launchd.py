"""macOS: the LaunchAgent plist (launchd.plist(5)); service/launchctl.py loads and drives it."""

from __future__ import annotations

import plistlib
from pathlib import Path

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
        # Seconds launchd waits between SIGTERM and SIGKILL (0 would mean forever).
        "ExitTimeOut": spec.stop_seconds,
        "StandardOutPath": str(spec.output_log),
        "StandardErrorPath": str(spec.output_log),
    }


def render(spec: ServiceSpec) -> bytes:
    """The plist file's bytes (XML)."""
    return plistlib.dumps(build(spec), sort_keys=False)


def program(path: Path) -> list[str]:
    """ProgramArguments of an installed plist ([] when it cannot be read)."""
    try:
        return list(plistlib.loads(path.read_bytes()).get("ProgramArguments", []))
    except (OSError, plistlib.InvalidFileException, ValueError):
        return []

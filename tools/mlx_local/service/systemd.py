"""Linux: the systemd user unit, and driving it with `systemctl --user`."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from ..errors import UserError
from .unitenv import ServiceSpec

UNIT = "mlx-local.service"
RESTART_SECONDS = 5


def default_dir() -> Path:
    """Where the user's own systemd units live."""
    config_home = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config_home) / "systemd" / "user"


def file_name() -> str:
    return UNIT


def _specifiers(text: str) -> str:
    """Escape `%` so systemd does not expand specifiers."""
    return text.replace("%", "%%")


def quote(word: str) -> str:
    """One word of a unit setting, double-quoted: C escapes for \\ and ", %% and $$ doubled."""
    escaped = word.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + _specifiers(escaped).replace("$", "$$") + '"'


def _env_assignment(name: str, value: str) -> str:
    escaped = f"{name}={value}".replace("\\", "\\\\").replace('"', '\\"')
    return '"' + _specifiers(escaped) + '"'


def _path(path: Path) -> str:
    """A path setting (WorkingDirectory=, append:): taken verbatim to the end of the line."""
    text = str(path)
    if "\n" in text:
        raise UserError(f"path {text!r} contains a newline, which a systemd unit cannot hold")
    return _specifiers(text)


def render(spec: ServiceSpec) -> str:
    """The unit file's text (see systemd.service(5), systemd.exec(5))."""
    environment = " ".join(_env_assignment(k, v) for k, v in spec.environment.items())
    return "\n".join(
        [
            "[Unit]",
            "Description=mlx-local: the patched mlx-lm server (OpenAI-compatible API)",
            "After=network.target",
            # A server that keeps failing at start (a bad config) gives up after 5 tries.
            "StartLimitIntervalSec=300",
            "StartLimitBurst=5",
            "",
            "[Service]",
            "Type=simple",
            f"WorkingDirectory={_path(spec.working_dir)}",
            f"Environment={environment}",
            "ExecStart=" + " ".join(quote(part) for part in spec.program),
            # Restart after a crash, not after `systemctl stop` or a clean exit.
            "Restart=on-failure",
            f"RestartSec={RESTART_SECONDS}",
            # SIGTERM to the server only; its log copier ends by itself once the server is gone.
            "KillMode=mixed",
            f"TimeoutStopSec={int(spec.stop_timeout)}",
            f"StandardOutput=append:{_path(spec.output_log)}",
            "StandardError=inherit",
            "",
            "[Install]",
            "WantedBy=default.target",
            "",
        ]
    )


def _systemctl(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    try:
        result = subprocess.run(
            ["systemctl", "--user", *args], capture_output=True, text=True, timeout=60
        )
    except FileNotFoundError:
        raise UserError("systemctl is not installed; cannot manage a systemd user unit") from None
    if check and result.returncode != 0:
        detail = (result.stderr or result.stdout).strip()
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
    """ActiveState, SubState, MainPID, Result of the unit."""
    result = _systemctl(
        "show", UNIT, "-p", "ActiveState,SubState,MainPID,Result,LoadState", check=False
    )
    pairs = (line.partition("=") for line in result.stdout.splitlines())
    return {key: value for key, _, value in pairs}


def pid() -> int | None:
    value = show().get("MainPID", "0")
    return int(value) if value.isdigit() and value != "0" else None


def enable_and_start() -> None:
    _systemctl("daemon-reload")
    _systemctl("enable", UNIT)
    _systemctl("restart", UNIT)


def start() -> None:
    _systemctl("start", UNIT)


def stop() -> bool:
    """Stop the unit (it stays stopped: Restart=on-failure ignores a stop). False if inactive."""
    was_active = show().get("ActiveState") in ("active", "activating", "reloading")
    _systemctl("stop", UNIT)
    return was_active


def disable() -> None:
    _systemctl("disable", "--now", UNIT, check=False)
    _systemctl("daemon-reload")

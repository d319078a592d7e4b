"""Linux: the systemd user unit (systemd.service(5)); service/systemctl.py drives it."""

from __future__ import annotations

import os
import shlex
from pathlib import Path

from ..errors import UserError
from .keystore import CREDENTIAL
from .unitenv import ServiceSpec

UNIT = "mlx-local.service"
RESTART_SECONDS = 5
EXIT_FILE = "service-exit"  # in the project's .mlx-local/: how the last run ended
# Run after every end of the server (systemd.service(5), ExecStopPost=): systemd forgets an
# inactive unit's exit status once it unloads it, so keep "exited 0", "killed TERM", ...
RECORD_EXIT = 'printf "%s %s\\n" "$EXIT_CODE" "$EXIT_STATUS" > "$0"'


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
    # The stored API key: systemd copies the 0600 file into the service's private
    # $CREDENTIALS_DIRECTORY, where `serve` reads it (systemd.exec(5), Credentials).
    credential = (
        [f"LoadCredential={CREDENTIAL}:{_path(spec.credential)}"] if spec.credential else []
    )
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
            *credential,
            "ExecStopPost=-"  # "-": a failure here does not fail the unit
            + " ".join(quote(w) for w in ["/bin/sh", "-c", RECORD_EXIT, str(exit_file(spec))]),
            # Restart after a crash, not after `systemctl stop` or a clean exit.
            "Restart=on-failure",
            f"RestartSec={RESTART_SECONDS}",
            # SIGTERM to the server only; its log copier ends by itself once the server is gone.
            "KillMode=mixed",
            f"TimeoutStopSec={spec.stop_seconds}",  # 0 would mean forever
            f"StandardOutput=append:{_path(spec.output_log)}",
            "StandardError=inherit",
            "",
            "[Install]",
            "WantedBy=default.target",
            "",
        ]
    )


def exit_file(spec: ServiceSpec) -> Path:
    return spec.state_dir / EXIT_FILE


def program(path: Path) -> list[str]:
    """ExecStart= of an installed unit as words ([] when it cannot be read)."""
    try:
        lines = path.read_text("utf-8").splitlines()
    except OSError:
        return []
    for line in lines:
        if line.startswith("ExecStart="):
            words = shlex.split(line.removeprefix("ExecStart="))
            return [word.replace("%%", "%").replace("$$", "$") for word in words]
    return []

"""install-service / uninstall-service: write or remove the launchd plist or systemd unit."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from ..atomic import write_atomic
from ..config import Config
from ..errors import UserError
from ..project import Project
from . import keystore, launchctl, launchd, systemctl, systemd
from .kind import Kind, native_kind
from .unitenv import service_spec

DIR_ENV = "MLX_LOCAL_SERVICE_DIR"


def target_dir(kind: Kind, dest: Path | None = None) -> Path:
    """Folder of the service file: `dest`, else $MLX_LOCAL_SERVICE_DIR, else the system's own."""
    if dest is not None:
        return dest
    if env := os.environ.get(DIR_ENV):
        return Path(env)
    return launchd.default_dir() if kind == "launchd" else systemd.default_dir()


def service_file(kind: Kind, dest: Path | None = None) -> Path:
    module = launchd if kind == "launchd" else systemd
    return target_dir(kind, dest) / module.file_name()


def driver(kind: Kind) -> ModuleType:
    """The module that drives the service manager: launchctl or systemctl."""
    return launchctl if kind == "launchd" else systemctl


def render(kind: Kind, project: Project, config: Config, serve_args: Sequence[str] = ()) -> bytes:
    """The service file's bytes for this project (`serve_args`: --model, --fallback-demo)."""
    credential = None
    if kind == "systemd" and config.options.get("api_key_stored"):
        credential = keystore.CredentialFile.default().path
    spec = service_spec(project, config, serve_args=serve_args, credential=credential, manager=kind)
    return launchd.render(spec) if kind == "launchd" else systemd.render(spec).encode()


def installed_kind(dest: Path | None = None) -> Kind | None:
    """The native service kind if its file is installed (and usable here), else None."""
    kind = native_kind()
    if not service_file(kind, dest).is_file():
        return None
    if kind == "systemd" and not systemctl.bus_available():
        return None
    return kind


def installed_program(kind: Kind) -> list[str]:
    """What the installed service runs (its ProgramArguments or ExecStart=)."""
    path = service_file(kind)
    return launchd.program(path) if kind == "launchd" else systemd.program(path)


def will_load(kind: Kind, write_only: bool) -> bool:
    """Whether install loads the service file too; fails when it should but cannot."""
    loadable = kind == native_kind() and not write_only
    if loadable and kind == "systemd" and not systemctl.bus_available():
        raise UserError(systemctl.no_bus_message() + "; pass --write-only to only write the unit")
    return loadable


@dataclass(frozen=True)
class InstallResult:
    path: Path
    changed: bool


def write(path: Path, content: bytes) -> bool:
    """Write the service file atomically unless it already holds `content`; True if written."""
    if path.is_file() and path.read_bytes() == content:
        return False
    write_atomic(path, content.decode())
    return True


def install(kind: Kind, project: Project, config: Config, dest: Path | None) -> InstallResult:
    """Write the service file (unchanged content is left alone) and the log folder."""
    path = service_file(kind, dest)
    changed = write(path, render(kind, project, config))
    config.service.log_dir.mkdir(parents=True, exist_ok=True)
    project.state_dir.mkdir(parents=True, exist_ok=True)
    return InstallResult(path, changed)


def uninstall(kind: Kind, config: Config, dest: Path | None, write_only: bool) -> Path | None:
    """Stop the service, remove its file; None if it was not installed."""
    path = service_file(kind, dest)
    loaded = kind == native_kind() and not write_only
    if loaded and (kind == "launchd" or (path.is_file() and systemctl.bus_available())):
        driver(kind).stop(config.service.stop_timeout, config.host, config.port)
    if not path.is_file():
        return None
    path.unlink()
    if loaded and (kind == "launchd" or systemctl.bus_available()):
        driver(kind).forget()
    return path

"""install-service / uninstall-service: write or remove the launchd plist or systemd unit."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..atomic import write_atomic
from ..config import Config
from ..errors import UserError
from ..project import Project
from . import launchd, systemd
from .unitenv import service_spec

DIR_ENV = "MLX_LOCAL_SERVICE_DIR"
MANAGER_ENV = "MLX_LOCAL_SERVICE_MANAGER"
Kind = Literal["launchd", "systemd"]
KINDS: tuple[Kind, ...] = ("launchd", "systemd")


def native_kind() -> Kind:
    """launchd on macOS, systemd elsewhere; $MLX_LOCAL_SERVICE_MANAGER names one instead (the
    tests drive the stand-in launchctl on Linux with it)."""
    chosen = os.environ.get(MANAGER_ENV)
    if chosen in KINDS:
        return chosen  # type: ignore[return-value]
    return "launchd" if sys.platform == "darwin" else "systemd"


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


def render(kind: Kind, project: Project, config: Config) -> bytes:
    """The service file's bytes for this project."""
    spec = service_spec(project, config)
    return launchd.render(spec) if kind == "launchd" else systemd.render(spec).encode()


def installed_kind(dest: Path | None = None) -> Kind | None:
    """The native service kind if its file is installed (and usable here), else None."""
    kind = native_kind()
    if not service_file(kind, dest).is_file():
        return None
    if kind == "systemd" and not systemd.bus_available():
        return None
    return kind


def will_load(kind: Kind, write_only: bool) -> bool:
    """Whether install loads the service file too; fails when it should but cannot."""
    loadable = kind == native_kind() and not write_only
    if loadable and kind == "systemd" and not systemd.bus_available():
        raise UserError(systemd.no_bus_message() + "; pass --write-only to only write the unit")
    return loadable


@dataclass(frozen=True)
class InstallResult:
    path: Path
    changed: bool
    loaded: bool


def install(
    kind: Kind, project: Project, config: Config, dest: Path | None, write_only: bool
) -> InstallResult:
    """Write the service file (atomically; unchanged content is left alone) and load it."""
    loadable = will_load(kind, write_only)
    path = service_file(kind, dest)
    content = render(kind, project, config)
    changed = not path.is_file() or path.read_bytes() != content
    if changed:
        write_atomic(path, content.decode())
    config.service.log_dir.mkdir(parents=True, exist_ok=True)
    if loadable:
        if kind == "launchd":
            if changed:
                launchd.stop()
            launchd.start(path)
        else:
            systemd.enable_and_start()
    return InstallResult(path, changed, loadable)


def uninstall(kind: Kind, dest: Path | None, write_only: bool) -> Path | None:
    """Unload and remove the service file; None if it was not installed."""
    path = service_file(kind, dest)
    if kind == native_kind() and not write_only:
        if kind == "launchd":
            launchd.stop()
        elif path.is_file() and systemd.bus_available():
            systemd.disable()
    if not path.is_file():
        return None
    path.unlink()
    return path

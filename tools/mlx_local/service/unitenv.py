"""What an installed service runs, shared by the launchd plist and the systemd unit."""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..config import Config
from ..project import PYTHON_ENV, ROOT_ENV, Project
from .keystore import SECURITY_ENV
from .kind import MANAGER_ENV, Kind

# Variables passed on to the service when they are set where `install-service` runs.
PASSED_ON = ("HF_HOME", "HF_HUB_CACHE", "HF_ENDPOINT", "HF_HUB_OFFLINE", PYTHON_ENV, SECURITY_ENV)
SYSTEM_PATH = "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"


@dataclass(frozen=True)
class ServiceSpec:
    """Program, folders and environment of the installed service, all absolute."""

    program: list[str]
    working_dir: Path
    environment: dict[str, str]
    output_log: Path
    stop_timeout: float
    state_dir: Path  # the project's .mlx-local/
    credential: Path | None = None  # the stored API key, for systemd's LoadCredential=

    @property
    def stop_seconds(self) -> int:
        """stop_timeout in whole seconds, rounded up: 0 means "wait forever" to launchd's
        ExitTimeOut and systemd's TimeoutStopSec."""
        return max(1, math.ceil(self.stop_timeout))


def cli_python() -> Path:
    """The venv's python, absolute but not resolved (resolving would leave the venv)."""
    return Path(os.path.abspath(sys.executable))


def service_spec(
    project: Project,
    config: Config,
    python: Path | None = None,
    environ: dict[str, str] | None = None,
    serve_args: Sequence[str] = (),
    credential: Path | None = None,
    manager: Kind | None = None,
) -> ServiceSpec:
    """The service for `project`: `<venv python> -m mlx_local.cli serve --log [serve_args]` in
    its root (serve_args: `--model M`, `--fallback-demo` from start/restart), told which
    `manager` runs it (its key store follows)."""
    environ = os.environ if environ is None else environ
    python = python or cli_python()
    root = project.root.absolute()
    environment = {
        ROOT_ENV: str(root),
        "PATH": f"{python.parent}:{SYSTEM_PATH}",
        "PYTHONUNBUFFERED": "1",
    }
    environment.update({name: environ[name] for name in PASSED_ON if environ.get(name)})
    if manager is not None:
        environment[MANAGER_ENV] = manager
    return ServiceSpec(
        program=[str(python), "-m", "mlx_local.cli", "serve", "--log", *serve_args],
        working_dir=root,
        environment=environment,
        output_log=config.service.log_dir.absolute() / "service.log",
        stop_timeout=config.service.stop_timeout,
        state_dir=project.state_dir.absolute(),
        credential=credential,
    )

"""Where things live: the project root and the paths below it."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT_ENV = "MLX_LOCAL_HOME"
PYTHON_ENV = "MLX_LOCAL_PYTHON"


def _looks_like_root(path: Path) -> bool:
    return (path / "patches" / "series").is_file() and (path / "pyproject.toml").is_file()


def find_root(start: Path | None = None) -> Path:
    """The project root: $MLX_LOCAL_HOME, else the folder holding this package's sources,
    else the nearest parent of the working directory that holds patches/series."""
    if env := os.environ.get(ROOT_ENV):
        return Path(env).resolve()
    source_root = Path(__file__).resolve().parents[2]
    if _looks_like_root(source_root):
        return source_root
    here = (start or Path.cwd()).resolve()
    for candidate in (here, *here.parents):
        if _looks_like_root(candidate):
            return candidate
    return source_root


@dataclass(frozen=True)
class Project:
    """Paths of one mlx-local project."""

    root: Path

    @property
    def patches_dir(self) -> Path:
        return self.root / "patches"

    @property
    def series_file(self) -> Path:
        return self.patches_dir / "series"

    @property
    def upstream_file(self) -> Path:
        return self.patches_dir / "upstream.toml"

    @property
    def checkout_dir(self) -> Path:
        return self.root / "mlx-lm-repo"

    @property
    def models_dir(self) -> Path:
        return self.root / "local-models"

    @property
    def logs_dir(self) -> Path:
        return self.root / "logs"

    @property
    def cache_dir(self) -> Path:
        return self.root / ".cache"

    @property
    def state_dir(self) -> Path:
        """Private state of running operations (locks, update-in-progress records)."""
        return self.root / ".mlx-local"

    @property
    def service_dir(self) -> Path:
        return self.root / "service"

    @property
    def user_config_file(self) -> Path:
        return self.root / "config.toml"

    @property
    def default_config_file(self) -> Path:
        return self.service_dir / "config.default.toml"


def current() -> Project:
    """The project this process works on."""
    return Project(find_root())


def runtime_python() -> Path:
    """The interpreter that has the patched mlx-lm installed: $MLX_LOCAL_PYTHON or this one."""
    return Path(os.environ.get(PYTHON_ENV) or sys.executable)

"""Shared fixtures: the demo model, the stand-in upstream, a patched mlx-lm runtime."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet

from mlx_local import upstream
from mlx_local.demo_model import build_demo_model
from tests.helpers import REPO_ROOT, run_cli

STAND_IN_TAGS = ["v0.30.7", "v0.31.0", "v0.31.3", "v0.32.2"]
TEST_CACHE = REPO_ROOT / ".cache" / "tests"


@pytest.fixture(scope="session")
def demo_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Hugging Face-format model folder (random weights, local tokenizer)."""
    return build_demo_model(tmp_path_factory.mktemp("models") / "demo-tiny")


@pytest.fixture(scope="session")
def stand_in_upstream() -> Path:
    """A git repository built from mlx-lm's PyPI sdists: one commit per release, tags
    v0.30.7, v0.31.0, v0.31.3, v0.32.2. Cached between runs in .cache/ (git-ignored)."""
    settings = upstream.UpstreamSettings.load(REPO_ROOT / "patches" / "upstream.toml")
    only_wanted = dataclasses.replace(settings, supported=SpecifierSet("==0.0.0"))
    return upstream.build_pypi_mirror(
        TEST_CACHE / "stand-in-upstream",
        only_wanted,
        REPO_ROOT / ".cache" / "upstream" / "sdists",
        STAND_IN_TAGS,
    )


def make_project(root: Path) -> Path:
    """A project folder with a copy of this repository's patches/."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copytree(REPO_ROOT / "patches", root / "patches")
    shutil.copy(REPO_ROOT / "pyproject.toml", root / "pyproject.toml")
    (root / "local-models").mkdir()
    return root


@pytest.fixture
def project_copy(tmp_path: Path) -> Path:
    """A fresh project folder (patches/ copied from this repository), not set up."""
    return make_project(tmp_path / "project")


@dataclass(frozen=True)
class PatchedRuntime:
    """A project set up at v0.30.7 and a venv whose mlx_lm is that checkout."""

    root: Path
    python: Path

    @property
    def env(self) -> dict[str, str]:
        """Environment that points mlx-local commands at this project and venv."""
        return {"MLX_LOCAL_HOME": str(self.root), "MLX_LOCAL_PYTHON": str(self.python)}


@pytest.fixture(scope="session")
def patched_runtime(
    tmp_path_factory: pytest.TempPathFactory, stand_in_upstream: Path
) -> PatchedRuntime:
    """setup-repo for real: the stand-in upstream at v0.30.7, every patch of patches/series,
    installed editable (with mlx[cpu]) into a new venv."""
    base = tmp_path_factory.mktemp("runtime")
    root = make_project(base / "project")
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    runtime = PatchedRuntime(root, python)
    result = run_cli(
        ["--upstream", str(stand_in_upstream), "--source", "git", "--ref", "v0.32.2"],
        root,
        env={"MLX_LOCAL_PYTHON": str(python)},
        script="setup-repo",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return runtime


@pytest.fixture(autouse=True)
def _no_inherited_project(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests choose their project explicitly; never the developer's own."""
    for name in ("MLX_LOCAL_HOME", "MLX_LOCAL_PYTHON"):
        if name in os.environ:
            monkeypatch.delenv(name)

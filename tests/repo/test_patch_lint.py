"""`patches lint`: the Python files the queue adds or changes pass upstream's own ruff rules."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.conftest import PatchedRuntime
from tests.helpers import run_cli

pytestmark = pytest.mark.slow

AUTHOR = {
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@example.com",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@example.com",
    "PATH": "/usr/bin:/bin",
}


def git(repo: Path, *args: str) -> str:
    result = subprocess.run(
        ["git", "-C", str(repo), *args], capture_output=True, text=True, check=True, env=AUTHOR
    )
    return result.stdout.strip()


def test_the_queue_at_the_pin_is_lint_clean(patched_runtime: PatchedRuntime) -> None:
    result = run_cli(["patches", "lint"], patched_runtime.root, env=patched_runtime.env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "mlx_lm/server.py" in result.stdout
    assert "files clean" in result.stdout


def test_a_lint_problem_in_a_patched_file_fails(
    patched_runtime: PatchedRuntime, tmp_path: Path
) -> None:
    """A clone of the checkout whose branch gains an unused import: lint names it, exits 1."""
    source = patched_runtime.root / "mlx-lm-repo"
    base = git(source, "config", "mlx-local.base")
    project = tmp_path / "project"
    project.mkdir()
    (project / "patches").symlink_to(patched_runtime.root / "patches")
    repo = project / "mlx-lm-repo"
    subprocess.run(["git", "clone", "-q", "-b", "mlx-local", str(source), str(repo)], check=True)
    git(repo, "config", "mlx-local.base", base)
    git(repo, "fetch", "-q", "origin", f"refs/tags/{base}:refs/tags/{base}")
    module = repo / "mlx_lm" / "server_exit.py"
    module.write_text(module.read_text().replace("import atexit\n", "import atexit\nimport json\n"))
    git(repo, "commit", "-qam", "an unused import")

    result = run_cli(["patches", "lint"], project, env={"MLX_LOCAL_HOME": str(project)})
    assert result.returncode == 1, result.stdout + result.stderr
    assert "F401" in result.stdout and "server_exit.py" in result.stdout

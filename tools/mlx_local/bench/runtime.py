"""The two servers' interpreters: the patched checkout, and a pristine upstream tree of its base."""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from ..project import Project
from ..repo import checkout, gitutil
from ..server_help import server_options


@dataclass
class Runtime:
    """The two interpreters' setups: patched (the checkout) and pristine upstream."""

    python: Path
    base: str
    upstream_tree: Path
    options: set[str] = field(default_factory=set)

    @property
    def upstream_env(self) -> dict[str, str]:
        """Environment that makes `python` import upstream's unpatched mlx_lm."""
        return {"PYTHONPATH": str(self.upstream_tree)}


def upstream_tree(project: Project, repo: Path, base: str) -> Path:
    """A pristine copy of the base release's files (`git archive`), reused between runs."""
    dest = project.cache_dir / "bench" / f"upstream-{base}"
    if (dest / "mlx_lm" / "server.py").is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-upstream-{base}-", dir=dest.parent))
    try:
        archive = tmp / "tree.tar"
        gitutil.git(repo, "archive", "--format=tar", f"--output={archive}", base)
        with tarfile.open(archive) as tar:
            tar.extractall(tmp / "tree", filter="data")
        (tmp / "tree").rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def tree_without_patch(repo: Path, dest: Path, added_file: str) -> Path:
    """The checkout's branch as files at `dest`, with the patch that adds `added_file` taken
    out (its commit's diff reversed), for the same interpreter through PYTHONPATH."""
    commit = gitutil.out(
        repo, "log", "--format=%H", "--diff-filter=A", checkout.BRANCH, "--", added_file
    )
    if not commit:
        raise UserError(f"{repo} has no {added_file}: the patch that adds it is not applied")
    archive = dest.parent / f"{dest.name}.tar"
    gitutil.git(repo, "archive", "--format=tar", f"--output={archive}", checkout.BRANCH)
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data")
    diff = gitutil.git(repo, "diff", f"{commit}^", commit).stdout
    subprocess.run(["git", "apply", "-R"], input=diff, text=True, cwd=dest, check=True)
    return dest


def imported_from(python: Path, env: dict[str, str] | None = None) -> Path:
    """Where `python` (with `env`) imports mlx_lm from."""
    code = "import mlx_lm, os; print(os.path.dirname(os.path.abspath(mlx_lm.__file__)))"
    result = subprocess.run(
        [str(python), "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
    )
    if result.returncode != 0:
        raise UserError(
            f"{python} cannot import mlx_lm; run `setup-repo` (or set MLX_LOCAL_PYTHON)"
        )
    return Path(result.stdout.strip()).parent


def prepare(project: Project, python: Path) -> Runtime:
    """Check the patched runtime and lay out the pristine upstream tree next to it."""
    repo, base = checkout.require_checkout(project)
    tree = upstream_tree(project, repo, base)
    runtime = Runtime(python, base, tree)
    origin = imported_from(python, runtime.upstream_env)
    if origin.resolve() != tree.resolve():
        raise UserError(f"with PYTHONPATH={tree}, {python} still imports mlx_lm from {origin}")
    runtime.options = server_options(python)
    return runtime

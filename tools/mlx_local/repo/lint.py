"""`patches lint`: ruff on the Python files the patch queue adds or changes in mlx-lm-repo/,
under upstream's own rules (its pyproject.toml), so patched code reads like upstream's."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..project import Project
from . import gitutil
from .checkout import BRANCH, require_checkout


@dataclass(frozen=True)
class LintReport:
    """The files checked and what ruff said of them (empty when clean)."""

    files: list[str]
    problems: str


def queue_files(repo: Path, base: str) -> list[str]:
    """The .py files that the branch's patches add or change on top of `base`."""
    names = gitutil.out(
        repo, "diff", "--name-only", "--diff-filter=AM", f"{base}..refs/heads/{BRANCH}", "--"
    )
    return sorted(name for name in names.splitlines() if name.endswith(".py"))


def _ruff() -> Path:
    ruff = Path(sys.executable).parent / "ruff"
    if not ruff.is_file():
        raise UserError(f"ruff is not installed in {ruff.parent}; run `make venv`")
    return ruff


def lint_queue(project: Project) -> LintReport:
    """Run `ruff check` and `ruff format --check` from the checkout on the queue's files."""
    repo, base = require_checkout(project)
    files = queue_files(repo, base)
    if not files:
        return LintReport([], "")
    ruff = str(_ruff())
    problems = []
    for command in ([ruff, "check", *files], [ruff, "format", "--check", *files]):
        result = subprocess.run(command, cwd=repo, capture_output=True, text=True)
        if result.returncode != 0:
            problems.append((result.stdout + result.stderr).strip())
    return LintReport(files, "\n".join(problems))

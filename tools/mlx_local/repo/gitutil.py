"""Running git: one function that raises a clear error, and a few common queries."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping
from pathlib import Path

from ..errors import UserError


class GitError(UserError):
    """A git command failed; carries its output for reports."""

    def __init__(self, message: str, output: str = "") -> None:
        super().__init__(message)
        self.output = output


def git(
    repo: Path,
    *args: str,
    env: Mapping[str, str] | None = None,
    check: bool = True,
    timeout: float | None = None,
    input_text: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run `git -C repo args...`; raise GitError with git's message when it fails and `check`."""
    full_env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "LC_ALL": "C", **(env or {})}
    try:
        result = subprocess.run(
            ["git", "-C", str(repo), *args],
            capture_output=True,
            text=True,
            env=full_env,
            timeout=timeout,
            input=input_text,
        )
    except subprocess.TimeoutExpired:
        raise GitError(f"git {args[0]} timed out after {timeout:.0f}s") from None
    if check and result.returncode != 0:
        message = (result.stderr or result.stdout).strip().splitlines()
        detail = message[-1] if message else f"exit code {result.returncode}"
        raise GitError(f"git {' '.join(args[:2])} failed: {detail}", result.stdout + result.stderr)
    return result


def out(repo: Path, *args: str, **kwargs) -> str:
    """Standard output of a git command, stripped."""
    return git(repo, *args, **kwargs).stdout.strip()


def rev(repo: Path, name: str) -> str | None:
    """The commit id `name` resolves to, or None."""
    result = git(repo, "rev-parse", "--verify", "--quiet", f"{name}^{{commit}}", check=False)
    return result.stdout.strip() or None


def dirty_paths(repo: Path) -> list[str]:
    """Tracked changes and untracked, non-ignored files: work that a command must not lose."""
    lines = git(repo, "status", "--porcelain", "--untracked-files=all").stdout.splitlines()
    return [line[3:] for line in lines if line]


def tags(repo: Path) -> list[str]:
    """All tag names of `repo`."""
    return out(repo, "tag", "--list").splitlines()


def is_repo(path: Path) -> bool:
    """Whether `path` is the top of a git work tree."""
    if not (path / ".git").exists():
        return False
    result = git(path, "rev-parse", "--show-toplevel", check=False)
    return result.returncode == 0 and Path(result.stdout.strip()).resolve() == path.resolve()


def commits_between(repo: Path, base: str, head: str) -> list[str]:
    """Commit ids in base..head, oldest first."""
    text = out(repo, "rev-list", "--reverse", f"{base}..{head}")
    return text.splitlines()


def fixed_identity(name: str, email: str, date: str) -> dict[str, str]:
    """Environment that makes git's author and committer fixed (for reproducible commits)."""
    return {
        "GIT_AUTHOR_NAME": name,
        "GIT_AUTHOR_EMAIL": email,
        "GIT_AUTHOR_DATE": date,
        "GIT_COMMITTER_NAME": name,
        "GIT_COMMITTER_EMAIL": email,
        "GIT_COMMITTER_DATE": date,
    }

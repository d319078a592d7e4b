"""mlx-lm-repo/: the checkout, its base, the patched branch built in a scratch worktree, backups."""

from __future__ import annotations

import re
import shutil
from datetime import UTC, datetime
from pathlib import Path

from ..errors import UserError
from ..project import Project
from . import gitutil, patchqueue, upstream

BRANCH = "mlx-local"
BASE_KEY = "mlx-local.base"
SOURCE_KEY = "mlx-local.source"
UPSTREAM_KEY = "mlx-local.upstream"
BACKUP_PREFIX = "refs/mlx-local/backup"
EXCLUDES = ("*.egg-info/", "__pycache__/", "build/", ".mlx-local-*")


class PatchFailed(UserError):
    """A patch of the queue does not apply; carries the outcome for the report."""

    def __init__(self, outcome: patchqueue.ApplyOutcome, base: str) -> None:
        files = ", ".join(outcome.files) or "unknown files"
        super().__init__(
            f"patch {outcome.name} does not apply on {base} (conflicts in {files}); "
            "mlx-lm-repo/ was left as it was"
        )
        self.outcome = outcome


def checkout_base(repo: Path) -> str | None:
    """The release tag the checkout's branch is built on, as setup-repo recorded it."""
    if not gitutil.is_repo(repo):
        return None
    result = gitutil.git(repo, "config", "--get", BASE_KEY, check=False)
    return result.stdout.strip() or None


def record_upstream(repo: Path, source: str, upstream_url: str | None) -> None:
    """Remember where the checkout's upstream came from, for the next update-upstream."""
    gitutil.git(repo, "config", SOURCE_KEY, source)
    if upstream_url:
        gitutil.git(repo, "config", UPSTREAM_KEY, upstream_url)
    else:
        gitutil.git(repo, "config", "--unset-all", UPSTREAM_KEY, check=False)


def recorded_upstream(repo: Path) -> tuple[str, str | None]:
    """(source, upstream URL or None) as setup-repo or the last update recorded them."""
    source = gitutil.out(repo, "config", "--get", SOURCE_KEY, check=False) or "auto"
    url = gitutil.out(repo, "config", "--get", UPSTREAM_KEY, check=False) or None
    return source, url


def require_checkout(project: Project) -> tuple[Path, str]:
    """The checkout and its base tag, or a clear error when setup-repo has not run."""
    repo = project.checkout_dir
    base = checkout_base(repo)
    if base is None:
        raise UserError(f"{repo} is not set up; run `setup-repo` first")
    return repo, base


def refuse_dirty(repo: Path) -> None:
    """Refuse to go on when the checkout holds work that is not in a commit."""
    if patchqueue.am_in_progress(repo):
        raise UserError(
            f"an update is stopped at a conflict in {repo}; finish it with "
            "`update-upstream --continue` or `update-upstream --abort`"
        )
    dirty = gitutil.dirty_paths(repo)
    if dirty:
        shown = ", ".join(dirty[:5]) + (" ..." if len(dirty) > 5 else "")
        raise UserError(
            f"mlx-lm-repo/ has uncommitted changes ({shown}); keep them as a patch with "
            "`mlx-local patches new NAME`, or `git -C mlx-lm-repo stash`, then rerun"
        )


def provided_options(patches_dir: Path, entries: list[patchqueue.SeriesEntry]) -> list[str]:
    """Every `Provides:` item of the given patches."""
    items: list[str] = []
    for entry in entries:
        items.extend(patchqueue.read_patch(patches_dir / entry.name).provides)
    return items


def init_checkout(repo: Path) -> None:
    """Create an empty repository for the checkout, with our generated files ignored."""
    if repo.exists() and not gitutil.is_repo(repo) and any(repo.iterdir()):
        raise UserError(f"{repo} exists but is not a git repository; move it away and rerun")
    if not gitutil.is_repo(repo):
        repo.mkdir(parents=True, exist_ok=True)
        gitutil.git(repo, "init", "--quiet", "--initial-branch=main")
    exclude = repo / ".git" / "info" / "exclude"
    exclude.parent.mkdir(parents=True, exist_ok=True)
    existing = exclude.read_text() if exclude.exists() else ""
    missing = [line for line in EXCLUDES if line not in existing.splitlines()]
    if missing:
        exclude.write_text(existing + "".join(f"{line}\n" for line in missing))


def fetch_release(repo: Path, remote: upstream.Remote, tag: str) -> None:
    """Fetch one release tag from `remote` into `repo`."""
    if gitutil.rev(repo, f"refs/tags/{tag}"):
        return
    result = gitutil.git(
        repo,
        "fetch",
        "--quiet",
        "--no-tags",
        remote.location,
        f"+refs/tags/{tag}:refs/tags/{tag}",
        check=False,
        timeout=600,
    )
    if result.returncode != 0:
        known = remote_release_tags(remote.location)[-5:]
        hint = f"; recent releases: {', '.join(known)}" if known else ""
        raise UserError(f"upstream ({remote.source}) has no release {tag}{hint}")


def remote_tags(location: str) -> dict[str, str]:
    """Tag name -> commit id of every tag a remote has (annotated tags peeled)."""
    result = gitutil.git(Path.cwd(), "ls-remote", "--tags", location, check=False, timeout=60)
    found: dict[str, str] = {}
    for sha, ref in re.findall(r"^(\S+)\s+refs/tags/(\S+)$", result.stdout, flags=re.M):
        name = ref.removesuffix("^{}")
        if ref.endswith("^{}") or name not in found:
            found[name] = sha
    return found


def remote_release_tags(location: str) -> list[str]:
    """Release tags a remote has, oldest first."""
    return upstream.release_tags(list(remote_tags(location)))


def build_patched(
    project: Project, repo: Path, base: str, entries: list[patchqueue.SeriesEntry]
) -> tuple[str, list[patchqueue.ApplyOutcome]]:
    """Apply `entries` onto `base` in a temporary worktree; the checkout is not touched.
    Returns the resulting commit; raises PatchFailed naming the first patch that fails."""
    worktree = project.state_dir / "setup-worktree"
    remove_worktree(repo, worktree)
    worktree.parent.mkdir(parents=True, exist_ok=True)
    gitutil.git(repo, "worktree", "add", "--quiet", "--detach", str(worktree), base)
    try:
        outcomes = []
        for entry in entries:
            outcome = patchqueue.apply_patch(worktree, project.patches_dir / entry.name)
            if outcome.result in ("conflict", "empty"):
                if outcome.result == "empty":
                    outcome.detail = "the patch changes nothing on this base"
                raise PatchFailed(outcome, base)
            outcomes.append(outcome)
        return gitutil.out(worktree, "rev-parse", "HEAD"), outcomes
    finally:
        remove_worktree(repo, worktree)


def remove_worktree(repo: Path, worktree: Path) -> None:
    """Remove a temporary worktree and its administrative files, whatever state it is in."""
    if worktree.exists():
        gitutil.git(repo, "worktree", "remove", "--force", str(worktree), check=False)
        shutil.rmtree(worktree, ignore_errors=True)
    gitutil.git(repo, "worktree", "prune", check=False)


def move_branch(repo: Path, head: str, label: str, backup: bool = True) -> tuple[bool, str | None]:
    """Point the checkout's branch at `head` and check it out, keeping a backup ref of what
    the branch was (unless the caller keeps one). Returns (changed, backup ref)."""
    old = gitutil.rev(repo, f"refs/heads/{BRANCH}")
    current = gitutil.out(repo, "symbolic-ref", "--quiet", "--short", "HEAD", check=False)
    if old == head and current == BRANCH:
        return False, None
    backup_ref = None
    if backup and old and old != head:
        backup_ref = backup_ref_name(label)
        gitutil.git(repo, "update-ref", backup_ref, old)
    gitutil.git(repo, "checkout", "--quiet", "-B", BRANCH, head)
    return True, backup_ref


def backup_ref_name(label: str) -> str:
    """A new, unique backup ref name for `label` (setup, update...)."""
    return f"{BACKUP_PREFIX}/{label}-{datetime.now(UTC).strftime('%Y%m%dT%H%M%S%f')}"

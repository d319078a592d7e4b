"""mlx-lm-repo/: set up the patched checkout, install it editable, verify it."""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from packaging.version import Version

from . import gitutil, patchqueue, upstream
from .errors import UserError
from .project import Project, runtime_python

BRANCH = "mlx-local"
BASE_KEY = "mlx-local.base"
BACKUP_PREFIX = "refs/mlx-local/backup"
EXCLUDES = ("*.egg-info/", "__pycache__/", "build/", ".mlx-local-*")
BACKENDS = ("auto", "cpu", "metal", "cuda12", "cuda13")
# mlx 0.32 made streams per thread; servers before mlx-lm 0.31.3 then fail in their
# generation thread ("There is no Stream(cpu, 0) in current thread") and requests hang.
MLX_BOUNDS = ((Version("0.31.3"), "mlx<0.32"),)


class PatchFailed(UserError):
    """A patch of the queue does not apply; carries the outcome for the report."""

    def __init__(self, outcome: patchqueue.ApplyOutcome, base: str) -> None:
        files = ", ".join(outcome.files) or "unknown files"
        super().__init__(
            f"patch {outcome.name} does not apply on {base} (conflicts in {files}); "
            "mlx-lm-repo/ was left as it was"
        )
        self.outcome = outcome


@dataclass
class SetupReport:
    """What setup-repo did."""

    base: str
    head: str
    source: str
    applied: list[patchqueue.ApplyOutcome]
    skipped: list[str]
    branch_changed: bool
    installed: bool
    provides: list[str]
    notes: list[str] = field(default_factory=list)
    backup_ref: str | None = None


# ---- queries ---------------------------------------------------------------------------------


def checkout_base(repo: Path) -> str | None:
    """The release tag the checkout's branch is built on, as setup-repo recorded it."""
    if not gitutil.is_repo(repo):
        return None
    result = gitutil.git(repo, "config", "--get", BASE_KEY, check=False)
    return result.stdout.strip() or None


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


# ---- building the patched branch -------------------------------------------------------------


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


# ---- installing and verifying ----------------------------------------------------------------


def install_extra(backend: str) -> str:
    """The mlx-lm extra that brings the right mlx for this platform."""
    if backend == "auto":
        mac = platform.system() == "Darwin" and platform.machine() == "arm64"
        return "" if mac else "cpu"
    return "" if backend == "metal" else backend


def installed_origin(python: Path) -> Path | None:
    """Where `python` imports mlx_lm from, without importing it."""
    code = "import importlib.util as u; s = u.find_spec('mlx_lm'); print(s.origin if s else '')"
    result = subprocess.run([str(python), "-c", code], capture_output=True, text=True)
    origin = result.stdout.strip()
    return Path(origin).resolve() if result.returncode == 0 and origin else None


def is_installed_from(python: Path, repo: Path) -> bool:
    """Whether `python` imports mlx_lm from the checkout."""
    origin = installed_origin(python)
    return origin is not None and origin.is_relative_to(repo.resolve())


def mlx_bounds(repo: Path) -> list[str]:
    """Upper bounds on mlx that the checkout's base release needs."""
    version = upstream.tag_version(checkout_base(repo) or "")
    return [bound for below, bound in MLX_BOUNDS if version is not None and version < below]


def install_editable(python: Path, repo: Path, backend: str) -> None:
    """`pip install -e` the checkout into `python`'s environment."""
    extra = install_extra(backend)
    target = f"{repo}[{extra}]" if extra else str(repo)
    command = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    # Newer releases take their version from git (setuptools-scm), which would call the
    # patched branch a dev build and rewrite the tracked mlx_lm/_version.py: pin it to the base.
    base = upstream.tag_version(checkout_base(repo) or "")
    env = {**os.environ, "SETUPTOOLS_SCM_PRETEND_VERSION_FOR_MLX_LM": str(base or "0")}
    result = subprocess.run(
        [*command, "-e", target, *mlx_bounds(repo)], capture_output=True, text=True, env=env
    )
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise UserError(f"pip install -e {target} failed: {' | '.join(tail)}")
    if not is_installed_from(python, repo):
        origin = installed_origin(python)
        raise UserError(f"after installing, {python} still imports mlx_lm from {origin}")


def verify_server_options(python: Path, options: list[str]) -> None:
    """Check that the installed server's --help lists every option the patches provide."""
    result = subprocess.run(
        [str(python), "-m", "mlx_lm.server", "--help"], capture_output=True, text=True
    )
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:]
        raise UserError(f"the patched server does not start: {' '.join(tail)}")
    shown = set(re.findall(r"--[a-z0-9][a-z0-9-]*", result.stdout))
    missing = [option for option in options if option not in shown]
    if missing:
        raise UserError(f"the server's --help lacks {', '.join(missing)} after patching")


# ---- setup-repo ------------------------------------------------------------------------------


def setup(
    project: Project,
    ref: str | None = None,
    source: str = "auto",
    upstream_url: str | None = None,
    install: bool = True,
    backend: str = "auto",
) -> SetupReport:
    """Create or reuse mlx-lm-repo/ at release `ref` (default: the pin) with the series
    applied, install it editable and verify it. Reruns with nothing to do change nothing."""
    settings = upstream.UpstreamSettings.load(project.upstream_file)
    tag = ref or settings.pin
    version = upstream.tag_version(tag)
    if version is None:
        raise UserError(f"--ref {tag!r} is not a release tag like v0.30.7")
    series = patchqueue.Series.load(project.series_file)
    repo = project.checkout_dir
    if gitutil.is_repo(repo):
        refuse_dirty(repo)
    created = not repo.exists()
    init_checkout(repo)
    try:
        remote = upstream.Remote(str(repo), "local tag")
        if not gitutil.rev(repo, f"refs/tags/{tag}"):
            remote = upstream.resolve_remote(
                settings, project.cache_dir, source, upstream_url, wanted=[tag]
            )
            fetch_release(repo, remote, tag)
        active = series.active(version)
        head, outcomes = build_patched(project, repo, tag, active)
    except BaseException:
        if created:
            shutil.rmtree(repo, ignore_errors=True)
        raise
    changed, backup = move_branch(repo, head, "setup")
    gitutil.git(repo, "config", BASE_KEY, tag)
    provides = provided_options(project.patches_dir, active)
    python = runtime_python()
    installed = False
    if install:
        if changed or not is_installed_from(python, repo):
            install_editable(python, repo, backend)
            installed = True
        verify_server_options(python, provides)
    return SetupReport(
        base=tag,
        head=head,
        source=remote.source,
        applied=outcomes,
        skipped=[e.name for e in series.entries if not e.admits(version)],
        branch_changed=changed,
        installed=installed,
        provides=provides,
        notes=list(remote.notes),
        backup_ref=backup,
    )


# ---- the queue seen from the checkout --------------------------------------------------------


@dataclass(frozen=True)
class PatchStatus:
    """One series entry as `patches list` shows it."""

    name: str
    guard: str
    provides: tuple[str, ...]
    state: str  # applied / not for this base / applies / conflicts / no checkout


def queue_status(project: Project) -> tuple[str | None, list[PatchStatus]]:
    """The checkout's base and the state of every patch of the series at that base."""
    series = patchqueue.Series.load(project.series_file)
    repo = project.checkout_dir
    base = checkout_base(repo)
    subjects: set[str] = set()
    if base:
        log = gitutil.out(repo, "log", "--format=%s", f"{base}..refs/heads/{BRANCH}", check=False)
        subjects = set(log.splitlines())
    statuses = []
    for entry in series.entries:
        info = patchqueue.read_patch(project.patches_dir / entry.name)
        if base is None:
            state = "no checkout"
        elif not entry.admits(upstream.tag_version(base)):
            state = "not for this base"
        elif info.subject in subjects:
            state = "applied"
        else:
            state = "applies" if applies_on_branch(project, repo, entry) else "conflicts"
        statuses.append(PatchStatus(entry.name, str(entry.guard or ""), info.provides, state))
    return base, statuses


def applies_on_branch(project: Project, repo: Path, entry: patchqueue.SeriesEntry) -> bool:
    """Whether a patch that is not on the branch yet would apply on top of it."""
    try:
        build_patched(project, repo, f"refs/heads/{BRANCH}", [entry])
    except PatchFailed:
        return False
    return True


def export(project: Project, new_name: str | None = None) -> patchqueue.ExportReport:
    """Rewrite patches/ from the checkout's branch (refresh)."""
    repo, base = require_checkout(project)
    return patchqueue.export_queue(
        repo,
        base,
        f"refs/heads/{BRANCH}",
        project.patches_dir,
        upstream.tag_version(base),
        new_name=new_name,
    )


def new_patch(
    project: Project, name: str, subject: str | None, provides: list[str]
) -> patchqueue.ExportReport:
    """Turn the commits on top of the queue (and uncommitted changes, committed first with
    `subject`) into new patch files named after `name`."""
    repo, _ = require_checkout(project)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise UserError(f"patch name {name!r} must be letters, digits, '.', '_' or '-'")
    current = gitutil.out(repo, "symbolic-ref", "--quiet", "--short", "HEAD", check=False)
    if current != BRANCH:
        raise UserError(
            f"mlx-lm-repo/ is not on branch {BRANCH}; run `git -C mlx-lm-repo switch {BRANCH}`"
        )
    if gitutil.dirty_paths(repo):
        trailers = [f"Provides: {' '.join(provides)}"] if provides else []
        message = "\n\n".join([subject or name, "\n".join([*trailers, "Forwarded: no"])])
        gitutil.git(repo, "add", "--all")
        gitutil.git(repo, "commit", "--quiet", "-m", message)
    before = {e.name for e in patchqueue.Series.load(project.series_file).entries}
    report = export(project, new_name=name)
    if not set(report.written) - before:
        raise UserError(
            "no new commits or changes in mlx-lm-repo/ to turn into a patch; "
            "change files there first"
        )
    return report

"""The patch queue seen from the checkout: `patches list`, `patches export`, `patches new`."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..project import Project
from . import gitutil, patchqueue, upstream
from .absorption import absorbed_at, provided_upstream
from .checkout import BRANCH, PatchFailed, build_patched, checkout_base, require_checkout


@dataclass(frozen=True)
class PatchStatus:
    """One series entry as `patches list` shows it."""

    name: str
    guard: str
    provides: tuple[str, ...]
    state: (
        str  # applied / absorbed upstream / not for this base / applies / conflicts / no checkout
    )


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
        elif provided_upstream(repo, f"refs/tags/{base}", info.provides):
            state = "absorbed upstream"
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
    """Rewrite patches/ from the checkout's branch (refresh), at whatever base it is on."""
    repo, base = require_checkout(project)
    version = upstream.tag_version(base)
    active = patchqueue.Series.load(project.series_file).active(version)
    return patchqueue.export_queue(
        repo,
        base,
        f"refs/heads/{BRANCH}",
        project.patches_dir,
        version,
        at_pin=base == upstream.UpstreamSettings.load(project.upstream_file).pin,
        absorbed=frozenset(absorbed_at(repo, f"refs/tags/{base}", project.patches_dir, active)),
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

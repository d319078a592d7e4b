"""setup-repo: mlx-lm-repo/ at a release with the queue applied, installed and verified."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field

from ..errors import UserError
from ..project import Project, runtime_python
from . import gitutil, patchqueue, upstream
from .absorption import absorbed_at
from .checkout import (
    BASE_KEY,
    build_patched,
    fetch_release,
    init_checkout,
    move_branch,
    provided_options,
    record_upstream,
    refuse_dirty,
)
from .install import install_editable, is_installed_from, verify_server_options


@dataclass
class SetupReport:
    """What setup-repo did."""

    base: str
    head: str
    source: str
    applied: list[patchqueue.ApplyOutcome]
    skipped: list[str]
    absorbed: dict[str, tuple[str, ...]]
    branch_changed: bool
    installed: bool
    provides: list[str]
    notes: list[str] = field(default_factory=list)
    backup_ref: str | None = None


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
        absorbed = absorbed_at(repo, f"refs/tags/{tag}", project.patches_dir, active)
        to_apply = [entry for entry in active if entry.name not in absorbed]
        head, outcomes = build_patched(project, repo, tag, to_apply)
    except BaseException:
        if created:
            shutil.rmtree(repo, ignore_errors=True)
        raise
    changed, backup = move_branch(repo, head, "setup")
    gitutil.git(repo, "config", BASE_KEY, tag)
    if remote.source != "local tag":
        record_upstream(repo, source, upstream_url)
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
        absorbed=absorbed,
        branch_changed=changed,
        installed=installed,
        provides=provides,
        notes=list(remote.notes),
        backup_ref=backup,
    )

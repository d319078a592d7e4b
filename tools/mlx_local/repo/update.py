"""update-upstream: move the patch queue onto a newer mlx-lm release without losing work.

The rebase happens in a separate worktree (mlx-lm-repo-update/), so mlx-lm-repo/, its branch,
the installed server and patches/ stay untouched and usable until the update completes. A state
file records progress after every step, so an interruption is resolved by --continue or --abort.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from packaging.version import Version

from ..errors import UserError
from ..project import Project, runtime_python
from . import checkout, gitutil, patchqueue, upstream
from .absorption import (
    add_applied_upstream,
    first_release_providing,
    guard_below,
)
from .install import install_editable, verify_server_options
from .update_state import (
    PatchResult,
    UpdateReport,
    UpdateState,
    snapshot_dir,
    state_path,
    update_worktree,
)


def choose_target(remote: upstream.Remote, current: str, to: str | None, include_pre: bool) -> str:
    """The release to move to: `to` if the upstream has it, else the newest release."""
    available = list(checkout.remote_tags(remote.location))
    if to is not None:
        if upstream.tag_version(to) is None:
            raise UserError(f"--to {to!r} is not a release tag like v0.31.3")
        if to not in available:
            recent = ", ".join(upstream.release_tags(available)[-5:])
            raise UserError(f"upstream ({remote.source}) has no release {to}; recent: {recent}")
        target = to
    else:
        releases = upstream.release_tags(available, include_pre)
        if not releases:
            raise UserError(f"upstream ({remote.source}) lists no releases")
        target = releases[-1]
    if upstream.tag_version(target) < upstream.tag_version(current):
        raise UserError(
            f"{target} is older than the current base {current}; "
            f"use `setup-repo --ref {target}` to build an older release"
        )
    return target


def releases_between(
    repo: Path, remote: upstream.Remote, old: str, new: str, include_pre: bool
) -> list[list[str]]:
    """[tag, commit] of the releases after `old` up to `new`, their objects fetched without
    creating any ref (so absorption can be dated to the first release that has a patch)."""
    commits = checkout.remote_tags(remote.location)
    low, high = upstream.tag_version(old), upstream.tag_version(new)
    tags = [
        t
        for t in upstream.release_tags(list(commits), include_pre or high.is_prerelease)
        if low < upstream.tag_version(t) <= high
    ]
    if tags:
        gitutil.git(
            repo,
            "fetch",
            "--quiet",
            "--no-tags",
            "--no-write-fetch-head",
            remote.location,
            *[f"refs/tags/{t}" for t in tags],
            timeout=600,
        )
    return [[t, commits[t]] for t in tags]


def apply_remaining(
    project: Project, state: UpdateState, worktree: Path, new_version: Version, save: bool
) -> PatchResult | None:
    """Apply the patches still to do; returns the conflicting patch's result, if any."""
    series = patchqueue.Series.load(project.series_file)
    while state.todo:
        name = state.todo[0]
        entry = series.find(name)
        info = patchqueue.read_patch(project.patches_dir / name)
        if entry is not None and not entry.admits(new_version):
            result = PatchResult(name, "not for this base", f"guard {entry.guard}")
        elif since := first_release_providing(worktree, state.releases, info.provides):
            provided = " ".join(info.provides)
            result = PatchResult(name, "absorbed", f"upstream provides {provided} since {since}")
            result.since = since
        else:
            outcome = patchqueue.apply_patch(
                worktree, project.patches_dir / name, allow_empty_drop=True
            )
            if outcome.result == "conflict":
                result = PatchResult(name, "conflict", "", outcome.files)
                state.results.append(result)
                if save:
                    state.save(state_path(project))
                return result
            result = PatchResult(name, "absorbed" if outcome.result == "empty" else outcome.result)
            if outcome.result == "empty":
                result.detail = "empty on the new base"
                result.since = state.new_base
        state.results.append(result)
        state.todo.pop(0)
        if save:
            state.save(state_path(project))
    return None


def start(
    project: Project,
    to: str | None = None,
    dry_run: bool = False,
    include_pre: bool = False,
    source: str | None = None,
    upstream_url: str | None = None,
    install: bool = True,
) -> UpdateReport:
    """Begin an update (or a dry run of one) to `to` or the newest release, from the upstream
    the checkout was set up from unless `source` or `upstream_url` say otherwise."""
    if UpdateState.load(state_path(project)):
        raise UserError(
            "an update is already in progress; finish it with `update-upstream --continue` "
            "or undo it with `update-upstream --abort`"
        )
    repo, old_base = checkout.require_checkout(project)
    checkout.refuse_dirty(repo)
    refuse_unexported(project, repo, old_base)
    recorded = source is None and upstream_url is None
    if recorded:
        source, upstream_url = checkout.recorded_upstream(repo)
    source = source or "auto"
    settings = upstream.UpstreamSettings.load(project.upstream_file)
    remote = upstream.resolve_remote(
        settings, project.cache_dir, source, upstream_url, wanted=[to] if to else [], refresh=True
    )
    if recorded and (upstream_url or source != "auto"):
        where = upstream_url or f"--source {source}"
        remote.notes.append(f"updating from the upstream setup-repo used: {where}")
    target = choose_target(remote, old_base, to, include_pre)
    old_head = gitutil.rev(repo, f"refs/heads/{checkout.BRANCH}")
    if target == old_base:
        return UpdateReport(old_base, target, [], "up-to-date", remote.source, remote.notes)
    old_version, new_version = upstream.tag_version(old_base), upstream.tag_version(target)
    series = patchqueue.Series.load(project.series_file)
    todo = [e.name for e in series.entries if e.admits(old_version) or e.admits(new_version)]
    had_tag = gitutil.rev(repo, f"refs/tags/{target}") is not None
    releases = releases_between(repo, remote, old_base, target, include_pre)
    if dry_run:
        return dry_run_update(project, repo, old_base, target, releases, todo, remote)
    checkout.fetch_release(repo, remote, target)
    checkout.record_upstream(repo, source, upstream_url)
    backup = checkout.backup_ref_name("update")
    gitutil.git(repo, "update-ref", backup, old_head)
    snapshot = snapshot_dir(project)
    shutil.rmtree(snapshot, ignore_errors=True)
    shutil.copytree(project.patches_dir, snapshot)
    worktree = update_worktree(project)
    state = UpdateState(
        old_base, target, old_head, backup, str(worktree), todo, releases, not had_tag, install
    )
    state.save(state_path(project))
    checkout.remove_worktree(repo, worktree)
    gitutil.git(repo, "worktree", "add", "--quiet", "--detach", str(worktree), target)
    report = proceed(project, state)
    report.source, report.notes = remote.source, list(remote.notes)
    return report


def refuse_unexported(project: Project, repo: Path, base: str) -> None:
    """Refuse when the branch has commits that patches/ does not hold yet."""
    series = patchqueue.Series.load(project.series_file)
    version = upstream.tag_version(base)
    queued = {
        patchqueue.read_patch(project.patches_dir / e.name).subject for e in series.active(version)
    }
    log = gitutil.out(repo, "log", "--format=%s", f"{base}..refs/heads/{checkout.BRANCH}")
    extra = [s for s in log.splitlines() if s not in queued]
    if extra:
        raise UserError(
            f"mlx-lm-repo/ has commits that are not in patches/ ({extra[0]!r}); keep them with "
            "`mlx-local patches export` (or `patches new NAME`) first"
        )


def dry_run_update(
    project: Project,
    repo: Path,
    old_base: str,
    target: str,
    releases: list[list[str]],
    todo: list[str],
    remote: upstream.Remote,
) -> UpdateReport:
    """Rebase in a throwaway worktree and report; nothing the user has is changed."""
    worktree = Path(tempfile.mkdtemp(prefix="update-dry-run-")) / "worktree"
    state = UpdateState(old_base, target, "", "", str(worktree), list(todo), releases)
    try:
        target_commit = releases[-1][1]
        gitutil.git(repo, "worktree", "add", "--quiet", "--detach", str(worktree), target_commit)
        conflict = apply_remaining(project, state, worktree, upstream.tag_version(target), False)
        hunks = patchqueue.conflict_hunks(worktree) if conflict else ""
        if conflict:
            gitutil.git(worktree, "am", "--abort", check=False)
        for name in state.todo[1:] if conflict else []:
            state.results.append(PatchResult(name, "not tried", "after the conflict"))
    finally:
        checkout.remove_worktree(repo, worktree)
        shutil.rmtree(worktree.parent, ignore_errors=True)
    return UpdateReport(
        old_base,
        target,
        state.results,
        "dry-run",
        remote.source,
        list(remote.notes),
        conflict_hunks=hunks,
    )


def proceed(project: Project, state: UpdateState) -> UpdateReport:
    """Apply what is left and, when nothing conflicts, finish the update."""
    worktree = Path(state.worktree)
    if state.stage == "applying":
        conflict = apply_remaining(
            project, state, worktree, upstream.tag_version(state.new_base), True
        )
        if conflict:
            return UpdateReport(
                state.old_base,
                state.new_base,
                state.results,
                "conflict",
                conflict_hunks=patchqueue.conflict_hunks(worktree),
                worktree=str(worktree),
                backup_ref=state.backup_ref,
            )
        state.stage = "finishing"
        state.save(state_path(project))
    return finish(project, state)


def finish(project: Project, state: UpdateState) -> UpdateReport:
    """Guard absorbed patches, move the branch, refresh patches/, move the pin, reinstall,
    verify. Every step can be repeated, so an interrupted finish is resumed by --continue."""
    repo = project.checkout_dir
    worktree = Path(state.worktree)
    new_version = upstream.tag_version(state.new_base)
    new_head = gitutil.out(worktree, "rev-parse", "HEAD")
    series = patchqueue.Series.load(project.series_file)
    for result in state.results:
        entry = series.find(result.name)
        if result.outcome == "absorbed" and entry is not None and entry.admits(new_version):
            since = result.since or state.new_base
            entry.guard = guard_below(entry.guard, upstream.tag_version(since))
            add_applied_upstream(project.patches_dir / result.name, since)
    series.save(project.series_file)
    checkout.remove_worktree(repo, worktree)
    checkout.move_branch(repo, new_head, "update", backup=False)
    gitutil.git(repo, "config", checkout.BASE_KEY, state.new_base)
    patchqueue.export_queue(
        repo,
        state.new_base,
        f"refs/heads/{checkout.BRANCH}",
        project.patches_dir,
        new_version,
        at_pin=True,  # the new base becomes the pin
    )
    upstream.write_pin(project.upstream_file, state.new_base)
    if state.install:
        python = runtime_python()
        install_editable(python, repo, "auto")
        series = patchqueue.Series.load(project.series_file)
        queued = [e for e in series.entries if e.name in {r.name for r in state.results}]
        verify_server_options(python, checkout.provided_options(project.patches_dir, queued))
    report = UpdateReport(
        state.old_base,
        state.new_base,
        state.results,
        "updated",
        range_diff=range_diff_summary(repo, state),
        server_changes=gitutil.out(
            repo, "diff", "--stat", state.old_base, state.new_base, "--", "mlx_lm/server.py"
        ),
        backup_ref=state.backup_ref,
    )
    state_path(project).unlink(missing_ok=True)
    shutil.rmtree(snapshot_dir(project), ignore_errors=True)
    return report


def range_diff_summary(repo: Path, state: UpdateState) -> list[str]:
    """One line per patch: how it changed between the old and the new base."""
    text = gitutil.out(
        repo,
        "range-diff",
        "--no-color",
        "--no-patch",
        f"{state.old_base}..{state.old_head}",
        f"{state.new_base}..refs/heads/{checkout.BRANCH}",
        check=False,
    )
    return [line for line in text.splitlines() if line.strip()]


def continue_update(project: Project) -> UpdateReport:
    """Go on after the user fixed a conflict in the update worktree."""
    state = UpdateState.load(state_path(project))
    if state is None:
        raise UserError("no update is in progress; start one with `update-upstream`")
    worktree = Path(state.worktree)
    if state.stage == "applying" and patchqueue.am_in_progress(worktree):
        unmerged = gitutil.out(worktree, "diff", "--name-only", "--diff-filter=U")
        if unmerged:
            raise UserError(
                f"conflicts remain in {worktree} ({', '.join(unmerged.splitlines())}); fix them, "
                "`git add` the files, then rerun `update-upstream --continue`"
            )
        name = state.todo[0]
        before = gitutil.rev(worktree, "HEAD")
        result = gitutil.git(worktree, "am", "--continue", env=patchqueue.COMMITTER, check=False)
        if result.returncode != 0 and "No changes" in result.stdout + result.stderr:
            gitutil.git(worktree, "am", "--skip")
        elif result.returncode != 0:
            raise UserError(f"git am --continue failed in {worktree}: {result.stderr.strip()}")
        moved = gitutil.rev(worktree, "HEAD") != before
        state.results = [r for r in state.results if r.name != name]
        outcome = "resolved" if moved else "absorbed"
        state.results.append(PatchResult(name, outcome, "fixed by hand"))
        state.todo.pop(0)
        state.save(state_path(project))
    return proceed(project, state)


def abort_update(project: Project) -> UpdateState:
    """Undo an update in progress: mlx-lm-repo/ and patches/ back to how they were."""
    state = UpdateState.load(state_path(project))
    if state is None:
        raise UserError("no update is in progress; nothing to abort")
    repo = project.checkout_dir
    worktree = Path(state.worktree)
    if worktree.exists() and patchqueue.am_in_progress(worktree):
        gitutil.git(worktree, "am", "--abort", check=False)
    checkout.remove_worktree(repo, worktree)
    snapshot = snapshot_dir(project)
    if snapshot.is_dir():
        restore_tree(snapshot, project.patches_dir)
    if gitutil.rev(repo, f"refs/heads/{checkout.BRANCH}") != state.old_head:
        checkout.move_branch(repo, state.old_head, "aborted-update")
    gitutil.git(repo, "config", checkout.BASE_KEY, state.old_base)
    gitutil.git(repo, "update-ref", "-d", state.backup_ref, check=False)
    if state.fetched_tag:
        gitutil.git(repo, "tag", "-d", state.new_base, check=False)
    state_path(project).unlink(missing_ok=True)
    shutil.rmtree(snapshot, ignore_errors=True)
    return state


def restore_tree(source: Path, dest: Path) -> None:
    """Make `dest` hold exactly the files of `source`, byte for byte."""
    for path in dest.iterdir():
        if not (source / path.name).exists() and path.is_file():
            path.unlink()
    for path in source.iterdir():
        if path.is_file():
            target = dest / path.name
            if not target.is_file() or target.read_bytes() != path.read_bytes():
                shutil.copy2(path, target)

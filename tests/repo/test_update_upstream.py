"""update-upstream on real git: absorbed patches, conflicts, --abort, --continue, refusals."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mlx_local.locking import project_lock
from mlx_local.repo import gitutil, patchqueue
from tests.helpers import run_cli
from tests.repo.test_setup_repo import repo_state, setup_repo

STAND_IN = ["--source", "git", "--no-install"]


def update(home: Path, upstream: Path, *extra: str):
    return run_cli(["--upstream", str(upstream), *STAND_IN, *extra], home, script="update-upstream")


def add_patch(home: Path, name: str, subject: str, edit, provides: str = "") -> None:
    """Make a change in the checkout and turn it into a patch with `patches new`."""
    edit(home / "mlx-lm-repo")
    args = ["patches", "new", name, "-m", subject]
    if provides:
        args.append(f"--provides={provides}")
    result = run_cli(args, home)
    assert result.returncode == 0, result.stderr


def add_option(repo: Path) -> None:
    """Add --prompt-cache-size to 0.30.7's parser (upstream adds it in 0.31.0)."""
    server = repo / "mlx_lm" / "server.py"
    text = server.read_text()
    anchor = '    parser.add_argument(\n        "--pipeline",'
    assert anchor in text
    option = '    parser.add_argument("--prompt-cache-size", type=int, default=10)\n'
    server.write_text(text.replace(anchor, option + anchor, 1))


def change_cache_size(repo: Path) -> None:
    """Change a line that upstream rewrote in 0.31.0: conflicts on 0.31.x."""
    server = repo / "mlx_lm" / "server.py"
    text = server.read_text()
    old = "    def __init__(self, max_size: int = 10):"
    assert old in text
    server.write_text(text.replace(old, "    def __init__(self, max_size: int = 20):", 1))


def add_note_module(repo: Path) -> None:
    (repo / "mlx_lm" / "local_note.py").write_text('"""Patched by mlx-local."""\n')


@pytest.fixture
def queued_project(project_copy: Path, stand_in_upstream: Path) -> Path:
    """A project at v0.30.7 whose queue has: an option upstream adds later, a change that
    conflicts with 0.31.x, and a new file that always applies."""
    (project_copy / "patches" / "series").write_text("")
    assert setup_repo(project_copy, stand_in_upstream, "--ref", "v0.30.7").returncode == 0
    add_patch(
        project_copy,
        "prompt-cache-size",
        "server: add --prompt-cache-size",
        add_option,
        provides="--prompt-cache-size",
    )
    add_patch(project_copy, "cache-size-20", "server: keep 20 caches", change_cache_size)
    add_patch(project_copy, "note", "add a note module", add_note_module)
    return project_copy


def snapshot(home: Path) -> dict[str, object]:
    """Every ref, the checkout's state and every byte of patches/."""
    patches = {p.name: p.read_bytes() for p in sorted((home / "patches").iterdir())}
    return {"repo": repo_state(home / "mlx-lm-repo"), "patches": patches}


def test_dry_run_reports_and_changes_nothing(queued_project: Path, stand_in_upstream: Path):
    before = snapshot(queued_project)
    result = update(queued_project, stand_in_upstream, "--to", "v0.31.3", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "dry run" in result.stdout
    assert re.search(r"prompt-cache-size\.patch\s*│\s*absorbed", result.stdout)
    assert re.search(r"cache-size-20\.patch\s*│\s*conflict", result.stdout)
    assert snapshot(queued_project) == before
    assert not (queued_project / "mlx-lm-repo-update").exists()


def test_conflict_stops_and_abort_restores_everything(
    queued_project: Path, stand_in_upstream: Path
):
    before = snapshot(queued_project)
    result = update(queued_project, stand_in_upstream, "--to", "v0.31.3")
    assert result.returncode == 1
    assert "0002-cache-size-20.patch" in result.stdout and "mlx_lm/server.py" in result.stdout
    assert "--continue" in result.stdout and "--abort" in result.stdout
    assert "<<<<<<<" in result.stdout or "max_size" in result.stdout  # the hunk is shown
    # until the update completes, the checkout and patches/ stay as they were
    assert snapshot(queued_project)["patches"] == before["patches"]
    assert repo_state(queued_project / "mlx-lm-repo")["head"] == before["repo"]["head"]
    second = update(queued_project, stand_in_upstream, "--to", "v0.31.3")
    assert second.returncode == 1 and "already in progress" in second.stderr

    aborted = run_cli(["update-upstream", "--abort"], queued_project)
    assert aborted.returncode == 0, aborted.stderr
    assert snapshot(queued_project) == before
    assert not (queued_project / "mlx-lm-repo-update").exists()


def test_continue_after_a_manual_fix_completes_the_update(
    queued_project: Path, stand_in_upstream: Path
):
    result = update(queued_project, stand_in_upstream, "--to", "v0.31.3")
    assert result.returncode == 1
    worktree = queued_project / "mlx-lm-repo-update"
    server = worktree / "mlx_lm" / "server.py"
    fixed = gitutil.git(worktree, "show", "v0.31.3:mlx_lm/server.py").stdout
    server.write_text(fixed + "# keep 20 caches (fixed by hand)\n")
    not_yet = run_cli(["update-upstream", "--continue", "--no-install"], queued_project)
    assert not_yet.returncode == 1 and "conflicts remain" in not_yet.stderr
    gitutil.git(worktree, "add", "mlx_lm/server.py")
    done = run_cli(["update-upstream", "--continue"], queued_project)
    assert done.returncode == 0, done.stdout + done.stderr
    repo = queued_project / "mlx-lm-repo"
    assert gitutil.out(repo, "config", "mlx-local.base") == "v0.31.3"
    assert "fixed by hand" in (repo / "mlx_lm" / "server.py").read_text()
    assert (repo / "mlx_lm" / "local_note.py").exists()
    series = patchqueue.Series.load(queued_project / "patches" / "series")
    guards = {e.name: str(e.guard or "") for e in series.entries}
    assert guards["0001-prompt-cache-size.patch"] == "<0.31.0"
    absorbed = patchqueue.read_patch(queued_project / "patches" / "0001-prompt-cache-size.patch")
    assert absorbed.applied_upstream == "v0.31.0"
    assert 'pin = "v0.31.3"' in (queued_project / "patches" / "upstream.toml").read_text()
    refreshed = (queued_project / "patches" / "0002-cache-size-20.patch").read_text()
    assert "+# keep 20 caches (fixed by hand)" in refreshed
    export = run_cli(["patches", "export"], queued_project)
    assert "already matches" in export.stdout  # patches/ is exactly the new branch
    # the absorbed patch still applies to the old base, so the old checkout can be rebuilt
    old = setup_repo(queued_project, stand_in_upstream, "--ref", "v0.30.7")
    assert old.returncode == 0, old.stderr
    assert "--prompt-cache-size" in (repo / "mlx_lm" / "server.py").read_text()


def test_clean_update_to_the_newest_release(project_copy: Path, stand_in_upstream: Path):
    (project_copy / "patches" / "series").write_text("")
    assert setup_repo(project_copy, stand_in_upstream, "--ref", "v0.30.7").returncode == 0
    add_patch(project_copy, "note", "add a note module", add_note_module)
    result = update(project_copy, stand_in_upstream)
    assert result.returncode == 0, result.stderr
    assert "v0.30.7 → v0.32.2" in result.stdout and "range-diff" in result.stdout
    again = update(project_copy, stand_in_upstream)
    assert again.returncode == 0 and "nothing to do" in again.stdout


def test_refusals_change_nothing(queued_project: Path, stand_in_upstream: Path, tmp_path: Path):
    before = snapshot(queued_project)
    unknown = update(queued_project, stand_in_upstream, "--to", "v9.9.9")
    assert unknown.returncode == 1 and "no release v9.9.9" in unknown.stderr
    unreachable = run_cli(
        ["--upstream", str(tmp_path / "missing"), *STAND_IN],
        queued_project,
        script="update-upstream",
    )
    assert unreachable.returncode == 1 and "missing" in unreachable.stderr
    with project_lock(queued_project / ".mlx-local", "update-upstream (test)"):
        busy = update(queued_project, stand_in_upstream)
    assert busy.returncode == 1 and "is running" in busy.stderr
    assert snapshot(queued_project) == before

    server = queued_project / "mlx-lm-repo" / "mlx_lm" / "server.py"
    server.write_text(server.read_text() + "# unsaved\n")
    dirty_before = snapshot(queued_project)
    dirty = update(queued_project, stand_in_upstream)
    assert dirty.returncode == 1 and "uncommitted changes" in dirty.stderr
    assert snapshot(queued_project) == dirty_before
    nothing = run_cli(["update-upstream", "--abort"], queued_project)
    assert nothing.returncode == 1 and "no update is in progress" in nothing.stderr

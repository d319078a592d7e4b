"""setup-repo and the patch queue, driven through the real CLI on real git repositories."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from mlx_local.repo import checkout, gitutil, patchqueue, upstream
from tests.conftest import STAND_IN_TAGS, PatchedRuntime
from tests.helpers import REPO_ROOT, run_cli

CONFLICTING_PATCH = """\
From 0000000000000000000000000000000000000000 Mon Sep 17 00:00:00 2001
From: Test <test@example.invalid>
Date: Mon, 1 Jan 2024 00:00:00 +0000
Subject: [PATCH] server: change a line that does not exist

Provides: --nothing
Forwarded: no
---
 mlx_lm/server.py | 2 +-
 1 file changed, 1 insertion(+), 1 deletion(-)

diff --git a/mlx_lm/server.py b/mlx_lm/server.py
--- a/mlx_lm/server.py
+++ b/mlx_lm/server.py
@@ -1,3 +1,3 @@
-this line is not in server.py
+neither is this one
 nor this
 nor that
"""


def setup_repo(home: Path, upstream: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return run_cli(
        ["--upstream", str(upstream), "--source", "git", "--no-install", *extra],
        home,
        script="setup-repo",
    )


def repo_state(repo: Path) -> dict[str, str]:
    """Everything a user could lose: refs, HEAD, index, status, file contents of changes."""
    return {
        "refs": gitutil.out(repo, "for-each-ref", "--format=%(refname) %(objectname)"),
        "head": gitutil.out(repo, "symbolic-ref", "-q", "HEAD", check=False)
        + gitutil.out(repo, "rev-parse", "HEAD"),
        "index": gitutil.out(repo, "ls-files", "--stage"),
        "status": gitutil.git(repo, "status", "--porcelain", "--untracked-files=all").stdout,
        "diff": gitutil.git(repo, "diff").stdout,
    }


def series_names(home: Path) -> list[str]:
    return [e.name for e in patchqueue.Series.load(home / "patches" / "series").entries]


def pinned(home: Path) -> str:
    return upstream.UpstreamSettings.load(home / "patches" / "upstream.toml").pin


def active_names(home: Path, tag: str) -> list[str]:
    """The patches setup-repo applies at release `tag`."""
    series = patchqueue.Series.load(home / "patches" / "series")
    return [e.name for e in series.active(upstream.tag_version(tag))]


def test_stand_in_upstream_has_one_reproducible_commit_per_release(
    stand_in_upstream: Path,
) -> None:
    assert gitutil.tags(stand_in_upstream) == STAND_IN_TAGS
    log = gitutil.out(stand_in_upstream, "log", "--format=%an|%s", "main").splitlines()
    assert log == [f"mlx-lm PyPI releases|mlx-lm {t[1:]}" for t in reversed(STAND_IN_TAGS)]
    for tag in STAND_IN_TAGS:
        assert gitutil.out(stand_in_upstream, "cat-file", "-t", tag) == "tag"  # annotated
        files = gitutil.out(stand_in_upstream, "ls-tree", "--name-only", tag).splitlines()
        assert "mlx_lm" in files and ("setup.py" in files or "pyproject.toml" in files)
        assert "PKG-INFO" not in files and not any(f.endswith(".egg-info") for f in files)


def test_setup_applies_the_queue_and_a_rerun_changes_nothing(
    project_copy: Path, stand_in_upstream: Path
) -> None:
    first = setup_repo(project_copy, stand_in_upstream)
    assert first.returncode == 0, first.stderr
    repo = project_copy / "mlx-lm-repo"
    pin = pinned(project_copy)
    names = active_names(project_copy, pin)
    assert names, "the queue applies patches at the pin"
    subjects = gitutil.out(repo, "log", "--reverse", "--format=%s", f"{pin}..HEAD").splitlines()
    expected = [patchqueue.read_patch(project_copy / "patches" / n).subject for n in names]
    assert subjects == expected
    assert gitutil.out(repo, "symbolic-ref", "--short", "HEAD") == checkout.BRANCH
    before = repo_state(repo)
    second = setup_repo(project_copy, stand_in_upstream)
    assert second.returncode == 0, second.stderr
    assert "nothing changed" in second.stdout
    assert repo_state(repo) == before


def test_authorship_of_each_patch_survives(project_copy: Path, stand_in_upstream: Path) -> None:
    assert setup_repo(project_copy, stand_in_upstream, "--ref", "v0.30.7").returncode == 0
    repo = project_copy / "mlx-lm-repo"
    authors = gitutil.out(repo, "log", "--reverse", "--format=%an <%ae>", "v0.30.7..HEAD")
    names = active_names(project_copy, "v0.30.7")
    # at the oldest base the old-base patches apply too; zip(strict) checks one commit each
    assert {
        "0001-server-prompt-cache-size.patch",
        "0002-server-kv-cache-quantization.patch",
    } <= set(names)
    for name, author in zip(names, authors.splitlines(), strict=True):
        info = patchqueue.read_patch(project_copy / "patches" / name)
        assert " ".join(info.author.split()) == author


def test_dirty_checkout_is_refused_and_nothing_is_lost(
    project_copy: Path, stand_in_upstream: Path
) -> None:
    assert setup_repo(project_copy, stand_in_upstream).returncode == 0
    repo = project_copy / "mlx-lm-repo"
    server = repo / "mlx_lm" / "server.py"
    server.write_text(server.read_text() + "\n# my unsaved work\n")
    (repo / "notes.txt").write_text("untracked work\n")
    before = repo_state(repo)
    result = setup_repo(project_copy, stand_in_upstream, "--ref", "v0.31.3")
    assert result.returncode == 1
    assert "uncommitted changes" in result.stderr and "patches new" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert repo_state(repo) == before
    assert (repo / "notes.txt").read_text() == "untracked work\n"


def test_a_failing_patch_leaves_the_checkout_as_it_was(
    project_copy: Path, stand_in_upstream: Path
) -> None:
    assert setup_repo(project_copy, stand_in_upstream).returncode == 0
    repo = project_copy / "mlx-lm-repo"
    before = repo_state(repo)
    patches = project_copy / "patches"
    (patches / "0099-broken.patch").write_text(CONFLICTING_PATCH)
    with (patches / "series").open("a") as series:
        series.write("0099-broken.patch\n")
    result = setup_repo(project_copy, stand_in_upstream)
    assert result.returncode == 1
    assert "0099-broken.patch" in result.stderr and "mlx_lm/server.py" in result.stderr
    assert repo_state(repo) == before
    assert not patchqueue.am_in_progress(repo)
    assert gitutil.out(repo, "worktree", "list").count("\n") == 0  # no stray worktree


def test_a_failing_patch_on_a_first_setup_leaves_no_checkout(
    project_copy: Path, stand_in_upstream: Path
) -> None:
    patches = project_copy / "patches"
    (patches / "0099-broken.patch").write_text(CONFLICTING_PATCH)
    (patches / "series").write_text("0099-broken.patch\n")
    result = setup_repo(project_copy, stand_in_upstream)
    assert result.returncode == 1 and "0099-broken.patch" in result.stderr
    assert not (project_copy / "mlx-lm-repo").exists()


def test_guards_choose_the_patches_for_each_base(
    project_copy: Path, stand_in_upstream: Path
) -> None:
    patches = project_copy / "patches"
    (patches / "0099-broken.patch").write_text(CONFLICTING_PATCH)
    (patches / "series").write_text("# only old bases\n0099-broken.patch  <0.30.0\n")
    result = setup_repo(project_copy, stand_in_upstream, "--ref", "v0.31.3")
    assert result.returncode == 0, result.stderr
    repo = project_copy / "mlx-lm-repo"
    assert gitutil.rev(repo, "HEAD") == gitutil.rev(repo, "v0.31.3")
    assert "not for this base" in result.stdout
    (patches / "series").write_text("0099-broken.patch  >=0.31.0,<0.32.0\n")
    result = setup_repo(project_copy, stand_in_upstream, "--ref", "v0.31.3")
    assert result.returncode == 1 and "0099-broken.patch" in result.stderr


def test_a_patch_upstream_already_provides_is_absorbed_whatever_its_guard(
    project_copy: Path, stand_in_upstream: Path
) -> None:
    # v0.31.0 is a real upstream tag that already has --prompt-cache-size, but the shipped
    # guard of 0001 (<0.31.1, dated from PyPI where 0.31.0 is yanked) still admits it.
    entry = patchqueue.Series.load(project_copy / "patches" / "series").find(
        "0001-server-prompt-cache-size.patch"
    )
    assert entry is not None and entry.admits(upstream.tag_version("v0.31.0"))
    result = setup_repo(project_copy, stand_in_upstream, "--ref", "v0.31.0")
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"0001-server-prompt-cache-size\.patch\s*│\s*absorbed", result.stdout)
    repo = project_copy / "mlx-lm-repo"
    subjects = gitutil.out(repo, "log", "--format=%s", "v0.31.0..HEAD").splitlines()
    assert not any("prompt-cache-size" in s for s in subjects) and len(subjects) >= 3
    listing = run_cli(["patches", "list"], project_copy, env={"COLUMNS": "200"})
    assert re.search(r"0001-server-prompt-cache-size\.patch.*absorbed upstream", listing.stdout)


def test_update_upstream_uses_the_upstream_setup_repo_used(
    project_copy: Path, stand_in_upstream: Path
) -> None:
    assert setup_repo(project_copy, stand_in_upstream, "--ref", "v0.31.3").returncode == 0
    result = run_cli(["--dry-run"], project_copy, script="update-upstream")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"updating from the upstream setup-repo used: {stand_in_upstream}" in result.stdout
    assert "v0.31.3 → " in result.stdout


def test_unknown_release_is_a_clear_error(project_copy: Path, stand_in_upstream: Path) -> None:
    result = setup_repo(project_copy, stand_in_upstream, "--ref", "v9.9.9")
    assert result.returncode == 1
    assert "no release v9.9.9" in result.stderr and "v0.32.2" in result.stderr
    result = setup_repo(project_copy, stand_in_upstream, "--ref", "main")
    assert result.returncode == 1 and "not a release tag" in result.stderr


def test_unreachable_git_upstream_names_what_was_tried(project_copy: Path, tmp_path: Path) -> None:
    result = setup_repo(project_copy, tmp_path / "no-such-repo")
    assert result.returncode == 1
    assert "cannot be reached" in result.stderr and "no-such-repo" in result.stderr


def test_export_round_trip_is_byte_identical(project_copy: Path, stand_in_upstream: Path) -> None:
    assert setup_repo(project_copy, stand_in_upstream).returncode == 0
    patches = project_copy / "patches"
    before = {p.name: p.read_bytes() for p in patches.iterdir()}
    result = run_cli(["patches", "export"], project_copy)
    assert result.returncode == 0, result.stderr
    assert "already matches" in result.stdout
    assert {p.name: p.read_bytes() for p in patches.iterdir()} == before


def test_patches_new_turns_a_change_into_a_patch_that_setup_reapplies(
    project_copy: Path, stand_in_upstream: Path, tmp_path: Path
) -> None:
    assert setup_repo(project_copy, stand_in_upstream).returncode == 0
    repo = project_copy / "mlx-lm-repo"
    readme = repo / "README.md"
    readme.write_text(readme.read_text() + "\nPatched locally.\n")
    result = run_cli(
        ["patches", "new", "readme-note", "-m", "readme: say it is patched", "--provides=--x"],
        project_copy,
    )
    assert result.returncode == 0, result.stderr
    names = series_names(project_copy)
    assert names[-1].endswith("-readme-note.patch")
    info = patchqueue.read_patch(project_copy / "patches" / names[-1])
    assert info.subject == "readme: say it is patched" and info.provides == ("--x",)
    tree = gitutil.out(repo, "rev-parse", "HEAD^{tree}")
    again = run_cli(["patches", "new", "again"], project_copy)
    assert again.returncode == 1 and "no new commits" in again.stderr

    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "patches").symlink_to(project_copy / "patches")
    assert setup_repo(fresh, stand_in_upstream).returncode == 0
    assert gitutil.out(fresh / "mlx-lm-repo", "rev-parse", "HEAD^{tree}") == tree

    listing = run_cli(["patches", "list"], project_copy)
    assert listing.returncode == 0 and "applied" in listing.stdout and "--x" in listing.stdout


@pytest.mark.parametrize("base", ["v0.30.7", "v0.31.0"])
def test_patches_new_at_an_older_base_writes_only_the_new_patch(
    project_copy: Path, stand_in_upstream: Path, tmp_path: Path, base: str
) -> None:
    """At a base other than the pin each patch's text differs (line numbers, blob ids), but
    what it does is the same: export leaves those files alone. v0.31.0 already provides
    0001's option, so 0001 is absorbed there (not on the branch) and must stay too."""
    assert setup_repo(project_copy, stand_in_upstream, "--ref", base).returncode == 0
    patches = project_copy / "patches"
    before = {p.name: p.read_bytes() for p in patches.iterdir()}
    names = series_names(project_copy)
    exported = run_cli(["patches", "export"], project_copy)
    assert exported.returncode == 0, exported.stderr
    assert "already matches" in exported.stdout
    assert {p.name: p.read_bytes() for p in patches.iterdir()} == before

    repo = project_copy / "mlx-lm-repo"
    readme = repo / "README.md"
    readme.write_text(readme.read_text() + "\nPatched locally.\n")
    result = run_cli(["patches", "new", "readme-note", "-m", "readme: a note"], project_copy)
    assert result.returncode == 0, result.stderr
    after = {p.name: p.read_bytes() for p in patches.iterdir()}
    (added,) = set(after) - set(before)
    # The new patch goes right after the last patch applied at this base: patches guarded
    # out here (newer than the base) stay after it, as the commits are on the branch.
    series = patchqueue.Series.load(patches / "series")
    applied = [e.name for e in series.active(upstream.tag_version(base)) if e.name != added]
    at = names.index(applied[-1]) + 1
    assert added.endswith("-readme-note.patch")
    assert series_names(project_copy) == [*names[:at], added, *names[at:]]
    assert {n: after[n] for n in before if n != "series"} == {
        n: text for n, text in before.items() if n != "series"
    }
    tree = gitutil.out(repo, "rev-parse", "HEAD^{tree}")
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "patches").symlink_to(patches)
    assert setup_repo(fresh, stand_in_upstream, "--ref", base).returncode == 0
    assert gitutil.out(fresh / "mlx-lm-repo", "rev-parse", "HEAD^{tree}") == tree


@pytest.mark.slow
def test_installed_checkout_is_what_python_imports(patched_runtime: PatchedRuntime) -> None:
    code = "import mlx_lm, sys; print(mlx_lm.__file__)"
    origin = subprocess.run(
        [str(patched_runtime.python), "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert Path(origin).is_relative_to(patched_runtime.root / "mlx-lm-repo")
    help_text = subprocess.run(
        [str(patched_runtime.python), "-m", "mlx_lm.server", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    series = patchqueue.Series.load(patched_runtime.root / "patches" / "series")
    provides = checkout.provided_options(patched_runtime.root / "patches", series.entries)
    assert provides, "the queue should provide server options"
    server_source = (Path(origin).parent / "server.py").read_text()
    for item in provides:
        if item.startswith("/"):  # an endpoint: routed in server.py
            assert f'"{item}"' in server_source, item
        else:
            assert item in help_text


def test_pypi_source_is_reproducible_and_works_offline_from_its_cache(
    project_copy: Path, stand_in_upstream: Path, tmp_path: Path
) -> None:
    """auto: git unreachable -> PyPI releases; with the sdists cached, no network is needed."""
    toml = project_copy / "patches" / "upstream.toml"
    text = toml.read_text()
    text = re.sub(r"(?m)^git_url = .*$", f'git_url = "{tmp_path / "no-such-repo"}"', text)
    text = re.sub(r"(?m)^pypi_json_url = .*$", 'pypi_json_url = "http://127.0.0.1:9/pypi"', text)
    text = re.sub(r"(?m)^supported = .*$", 'supported = "==0.30.7"', text)
    toml.write_text(text)
    cached = REPO_ROOT / ".cache" / "upstream" / "sdists"
    sdists = project_copy / ".cache" / "upstream" / "sdists"
    sdists.mkdir(parents=True)
    for name in ("index.json", "mlx_lm-0.30.7.tar.gz"):
        shutil.copy(cached / name, sdists / name)
    result = run_cli(["--ref", "v0.30.7", "--no-install"], project_copy, script="setup-repo")
    assert result.returncode == 0, result.stderr
    assert "unreachable" in result.stdout and "(pypi)" in result.stdout
    mirror = project_copy / ".cache" / "upstream" / "pypi-mirror"
    # the same release gives the same commit as the test stand-in built elsewhere
    assert gitutil.rev(mirror, "v0.30.7") == gitutil.rev(stand_in_upstream, "v0.30.7")
    repo = project_copy / "mlx-lm-repo"
    assert gitutil.rev(repo, "v0.30.7") == gitutil.rev(stand_in_upstream, "v0.30.7")

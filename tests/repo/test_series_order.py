"""The queue keeps its order: a patch that only older bases apply (the --allowed-origins
backport) stays before the patch built on it when patches/ is refreshed at the pin, and the
whole queue applies at every supported base."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from mlx_local.repo import patchqueue
from tests.helpers import run_cli

BACKPORT = "0007-server-allowed-origins.patch"
LOCAL_ONLY = "0008-server-local-only.patch"


def setup_repo(home: Path, upstream: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return run_cli(
        ["--upstream", str(upstream), "--source", "git", "--no-install", *extra],
        home,
        script="setup-repo",
    )


def series_lines(home: Path) -> list[str]:
    return [e.line() for e in patchqueue.Series.load(home / "patches" / "series").entries]


def test_refreshing_at_the_pin_keeps_guarded_patches_in_place(
    project_copy: Path, stand_in_upstream: Path
) -> None:
    patches = project_copy / "patches"
    before = {p.name: p.read_bytes() for p in patches.iterdir()}
    names = [line.split()[0] for line in series_lines(project_copy)]
    assert names.index(BACKPORT) < names.index(LOCAL_ONLY)

    assert setup_repo(project_copy, stand_in_upstream).returncode == 0
    export = run_cli(["patches", "export"], project_copy)
    assert export.returncode == 0, export.stderr
    assert {p.name: p.read_bytes() for p in patches.iterdir()} == before

    repo = project_copy / "mlx-lm-repo"
    (repo / "NOTES.md").write_text("local notes\n")
    new = run_cli(["patches", "new", "notes", "-m", "notes: add", "--provides=--x"], project_copy)
    assert new.returncode == 0, new.stderr
    lines = series_lines(project_copy)
    assert lines[:-1] == [line.decode() for line in before["series"].splitlines() if line.strip()]
    assert lines[-1].endswith("-notes.patch")


@pytest.mark.parametrize("tag", ["v0.30.7", "v0.31.3", "v0.32.2"])
def test_the_queue_gives_both_options_at_every_supported_base(
    project_copy: Path, stand_in_upstream: Path, tag: str
) -> None:
    result = setup_repo(project_copy, stand_in_upstream, "--ref", tag)
    assert result.returncode == 0, result.stdout + result.stderr
    server = (project_copy / "mlx-lm-repo" / "mlx_lm" / "server.py").read_text()
    assert '"--allowed-origins"' in server and '"--allowed-hosts"' in server
    assert "def parse_request(self)" in server

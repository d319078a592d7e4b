"""The idle_unload key: durations, off by default, refused in a [distributed] group."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlx_local import config
from mlx_local.errors import UserError
from mlx_local.project import Project
from mlx_local.service import command

PYTHON = Path("/usr/bin/python3")


@pytest.fixture
def proj(tmp_path: Path) -> Project:
    (tmp_path / "local-models" / "tiny").mkdir(parents=True)
    return Project(tmp_path)


def argv(proj: Project, text: str) -> list[str]:
    proj.user_config_file.write_text('model = "tiny"\n' + text)
    return command.build_command(config.load(proj), proj, PYTHON, environ={}).argv


@pytest.mark.parametrize(
    ("value", "seconds"),
    [('"90s"', "90"), ('"30m"', "1800"), ('"2h"', "7200"), ("45", "45"), ('"1.5m"', "90")],
)
def test_durations_become_seconds(proj: Project, value: str, seconds: str) -> None:
    args = argv(proj, f"idle_unload = {value}\n")
    assert args[args.index("--idle-unload") + 1] == seconds


def test_off_by_default_and_with_false(proj: Project) -> None:
    assert "--idle-unload" not in argv(proj, "")
    assert "--idle-unload" not in argv(proj, "idle_unload = false\n")


@pytest.mark.parametrize("value", ['"soon"', '"30 minutes"', "0", "-5", '"0s"', "true"])
def test_bad_durations_are_one_line_each(proj: Project, value: str) -> None:
    proj.user_config_file.write_text(f'model = "tiny"\nidle_unload = {value}\n')
    with pytest.raises(UserError) as caught:
        config.load(proj)
    assert f"idle_unload = {value.strip(chr(34))}" in str(caught.value).replace('"', "")
    assert 'a duration like "90s", "30m" or "2h"' in str(caught.value)


def test_refused_in_a_distributed_group(proj: Project) -> None:
    proj.user_config_file.write_text(
        'model = "tiny"\nidle_unload = "30m"\n[distributed]\nhosts = ["127.0.0.1", "127.0.0.2"]\n'
    )
    with pytest.raises(UserError) as caught:
        config.load(proj)
    lines = [line for line in str(caught.value).splitlines() if "idle_unload" in line]
    assert len(lines) == 1
    assert "a group does not unload its model" in lines[0]
    assert "allowed: idle_unload = false" in lines[0]

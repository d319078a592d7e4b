"""The config key `thinking_budget` (patch 0012's --thinking-budget): validated, passed to the
server, and refused at start in one line where the served mlx-lm lacks the option."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlx_local import config
from mlx_local.project import Project
from mlx_local.service import command
from tests.conftest import PatchedRuntime, make_project
from tests.helpers import REPO_ROOT, free_port, run_cli

PYTHON = Path("/opt/venv/bin/python")
HELP_WITHOUT_IT = "usage: server.py [--model MODEL] [--port PORT] [--prompt-cache-dir D]"


@pytest.fixture
def proj(tmp_path: Path) -> Project:
    (tmp_path / "local-models" / "tiny").mkdir(parents=True)
    return Project(tmp_path)


def test_the_key_becomes_the_option(proj: Project) -> None:
    proj.user_config_file.write_text('model = "tiny"\nthinking_budget = 0\n')
    argv = command.build_command(config.load(proj), proj, PYTHON, environ={}).argv
    assert argv[argv.index("--thinking-budget") + 1] == "0"
    proj.user_config_file.write_text('model = "tiny"\n')
    assert "--thinking-budget" not in command.build_command(config.load(proj), proj, PYTHON).argv


@pytest.mark.parametrize("value", ["-1", "2.5", '"64"', "true"])
def test_a_bad_value_is_refused_in_one_line(proj: Project, value: str) -> None:
    proj.user_config_file.write_text(f'model = "tiny"\nthinking_budget = {value}\n')
    result = run_cli(["config", "check", "--no-probe"], proj.root)
    assert result.returncode == 1
    assert f"thinking_budget = {value} is not allowed; allowed: an integer >= 0" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_server_without_the_patch_is_told_which_patch_and_release() -> None:
    proj = Project(REPO_ROOT)
    queued = command.queued_options(proj)
    assert queued["--thinking-budget"].name == "0012-server-thinking-budget.patch"
    cmd = command.ServerCommand(
        [str(PYTHON), "-m", "mlx_lm.server", "--model", "m", "--thinking-budget", "8"]
    )
    problem = command.patch_option_problem(cmd, HELP_WITHOUT_IT, queued)
    assert problem == (
        "the server in mlx-lm-repo/ lacks --thinking-budget (config key thinking_budget): "
        "patch 0012-server-thinking-budget.patch applies to mlx-lm >=0.32.0 only; move to such "
        "a release with update-upstream, or remove the key from the config"
    )
    assert (
        command.patch_option_problem(cmd, HELP_WITHOUT_IT + " [--thinking-budget N]", queued)
        is None
    )


@pytest.mark.slow
def test_an_older_base_refuses_the_key_at_start(
    tmp_path: Path, demo_model: Path, patched_runtime: PatchedRuntime, stand_in_upstream: Path
) -> None:
    root = make_project(tmp_path / "project")
    (root / "local-models" / "demo").symlink_to(demo_model)
    (root / "config.toml").write_text(
        f'model = "demo"\nport = {free_port()}\nprompt_cache_dir = false\nthinking_budget = 8\n'
    )
    env = {"MLX_LOCAL_PYTHON": str(patched_runtime.python)}
    setup = ["--upstream", str(stand_in_upstream), "--source", "git", "--ref", "v0.31.3"]
    done = run_cli([*setup, "--no-install"], root, env=env, script="setup-repo")
    assert done.returncode == 0, done.stdout + done.stderr
    for args in (["serve"], ["start"]):
        result = run_cli(args, root, env=env, timeout=120)
        assert result.returncode == 1, result.stdout + result.stderr
        lines = result.stderr.strip().splitlines()
        assert "lacks --thinking-budget (config key thinking_budget)" in lines[-1]
        assert "0012-server-thinking-budget.patch applies to mlx-lm >=0.32.0" in lines[-1]
    run_cli(["stop"], root, env=env, timeout=120)

"""mlx-local connect AGENT: the setups of the coding agents, the same ones tests/agents/ runs
the real agents with, printed for the configured host, port and served id, written with
--write, and shown verbatim in the README (tests/test_docs.py)."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

from mlx_local.service import connect
from tests.helpers import run_cli


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    root.mkdir()
    (root / "config.toml").write_text(
        'model = "demo"\nhost = "0.0.0.0"\nport = 8123\nserved_model_name = "local-coder"\n'
        'api_key_env = "SOME_KEY"\n'
    )
    return root


def test_connect_prints_the_setup_for_the_configured_service(project: Path) -> None:
    result = run_cli(["connect", "claude"], project, env={"SOME_KEY": "secret-7f3a"})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    # A wildcard bind is reached on loopback; the key is the shell's variable, never the key.
    assert 'export ANTHROPIC_BASE_URL="http://127.0.0.1:8123"' in lines
    assert 'export ANTHROPIC_MODEL="local-coder"' in lines
    assert 'export ANTHROPIC_API_KEY="$MLX_LOCAL_API_KEY"' in lines
    assert "secret-7f3a" not in result.stdout


def test_connect_write_writes_the_file_once_and_never_over_another(
    project: Path, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    env = {"HOME": str(home), "SOME_KEY": "k"}
    for _ in range(2):  # new, then identical: both fine
        result = run_cli(["connect", "codex", "--write"], project, env=env)
        assert result.returncode == 0, result.stderr
    config = tomllib.loads((home / ".codex" / "config.toml").read_text())
    provider = config["model_providers"][config["model_provider"]]
    assert provider["base_url"] == "http://127.0.0.1:8123/v1"
    assert provider["wire_api"] == "responses" and provider["env_key"] == connect.KEY_ENV
    assert config["model"] == "local-coder"

    assert run_cli(["connect", "opencode", "--write"], project, env=env).returncode == 0
    opencode = json.loads((home / ".config" / "opencode" / "opencode.json").read_text())
    assert opencode["model"] == "mlx-local/local-coder"

    (home / ".codex" / "config.toml").write_text('model = "mine"\n')
    result = run_cli(["connect", "codex", "--write"], project, env=env)
    assert result.returncode == 1 and "exists and differs" in result.stderr
    assert (home / ".codex" / "config.toml").read_text() == 'model = "mine"\n'

    result = run_cli(["connect", "claude", "--write"], project, env=env)
    assert result.returncode == 1 and "environment variables" in result.stderr


def test_claude_gets_the_context_of_a_local_model(tmp_path: Path, demo_model: Path) -> None:
    """Else Claude Code assumes 1M tokens for a model it does not know, and compacts late."""
    root = tmp_path / "local"
    root.mkdir()
    (root / "config.toml").write_text(f'model = "{demo_model}"\n')
    result = run_cli(["connect", "claude"], root)
    assert result.returncode == 0, result.stderr
    context = json.loads((demo_model / "config.json").read_text())["max_position_embeddings"]
    assert f'export CLAUDE_CODE_MAX_CONTEXT_TOKENS="{context}"' in result.stdout.splitlines()

"""The settings file: defaults, the user's copy, validation messages, atomic writes."""

from __future__ import annotations

import os
import stat
import tomllib
from pathlib import Path

import pytest

from mlx_local import atomic, config
from mlx_local.errors import UserError
from mlx_local.project import Project
from tests.helpers import REPO_ROOT, run_cli


@pytest.fixture
def proj(tmp_path: Path) -> Project:
    """A bare project root (its defaults come from this source tree)."""
    return Project(tmp_path)


def write_user(proj: Project, text: str) -> None:
    proj.user_config_file.write_text(text)


def problems_of(proj: Project, text: str) -> str:
    write_user(proj, text)
    with pytest.raises(UserError) as caught:
        config.load(proj)
    return str(caught.value)


def test_defaults_are_valid_and_documented(proj: Project) -> None:
    cfg = config.load(proj)
    assert cfg.model == "mlx-community/Qwen3-0.6B-4bit"
    assert (cfg.host, cfg.port, cfg.served_model_name) == ("127.0.0.1", 8000, "mlx-local")
    assert cfg.service.log_file == proj.root / "logs" / "server.log"
    assert (cfg.service.log_max_mb, cfg.service.log_backups) == (10, 3)
    text = (REPO_ROOT / "service" / "config.default.toml").read_text()
    for key in [*config.SERVER_KEYS, *config.SERVICE_KEYS]:
        assert key in text, f"{key} is not documented in config.default.toml"


def test_first_use_creates_the_user_copy_from_defaults(proj: Project) -> None:
    assert not proj.user_config_file.exists()
    config.load(proj)
    defaults = (REPO_ROOT / "service" / "config.default.toml").read_text()
    assert proj.user_config_file.read_text() == defaults
    assert stat.S_IMODE(proj.user_config_file.stat().st_mode) == 0o600  # it may hold a key


def test_user_values_override_defaults_key_by_key(proj: Project) -> None:
    write_user(proj, 'model = "tiny"\nport = 9001\n[service]\nlog_dir = "/var/tmp/x"\n')
    cfg = config.load(proj)
    assert (cfg.model, cfg.port, cfg.host) == ("tiny", 9001, "127.0.0.1")
    assert cfg.service.log_dir == Path("/var/tmp/x")
    assert cfg.service.stop_timeout == 15  # from the defaults' [service] table


BAD_VALUES = [
    ("port = 0", "port = 0", "an integer from 1 to 65535"),
    ('port = "8000"', 'port = "8000"', "an integer from 1 to 65535"),
    ("port = true", "port = true", "an integer from 1 to 65535"),
    ('host = ""', 'host = ""', "a non-empty string"),
    ('served_model_name = "my model"', 'served_model_name = "my model"', "without spaces"),
    ("max_tokens = 0", "max_tokens = 0", "an integer >= 1"),
    ("prompt_cache_size = 0", "prompt_cache_size = 0", "an integer >= 1"),
    ("kv_bits = 5", "kv_bits = 5", "one of 2, 3, 4, 6, 8"),
    ("kv_bits = 4\nkv_group_size = 48", "kv_group_size = 48", "one of 32, 64, 128"),
    ("quantized_kv_start = -1", "quantized_kv_start = -1", "an integer >= 0"),
    ("temp = -0.5", "temp = -0.5", "a number >= 0"),
    ("top_p = 0", "top_p = 0", "a number > 0 and <= 1"),
    ("top_p = 1.5", "top_p = 1.5", "a number > 0 and <= 1"),
    ("top_k = 2.5", "top_k = 2.5", "an integer >= 0"),
    ("min_p = 2", "min_p = 2", "a number >= 0 and <= 1"),
    ('chat_template_args = "{}"', 'chat_template_args = "{}"', "a TOML table"),
    ('trust_remote_code = "yes"', 'trust_remote_code = "yes"', "true or false"),
    ('log_level = "LOUD"', 'log_level = "LOUD"', '"DEBUG", "INFO"'),
    ('api_key_env = "1BAD-NAME"', 'api_key_env = "1BAD-NAME"', "environment variable name"),
    ("num_draft_tokens = 0", "num_draft_tokens = 0", "an integer >= 1"),
    ("prompt_cache_dir = true", "prompt_cache_dir = true", "or false to turn it off"),
    (
        'prompt_cache_dir = "d"\nprompt_cache_dir_bytes = "lots"',
        'prompt_cache_dir_bytes = "lots"',
        'a byte count: an integer, or a string like "512M"',
    ),
    ("[service]\nlog_max_mb = 0", "service.log_max_mb = 0", "an integer from 1 to 10000"),
    ("[service]\nstop_timeout = 0", "service.stop_timeout = 0", "a number > 0"),
]


@pytest.mark.parametrize(("text", "named", "allowed"), BAD_VALUES, ids=[b[1] for b in BAD_VALUES])
def test_bad_value_names_key_value_and_what_is_allowed(
    proj: Project, text: str, named: str, allowed: str
) -> None:
    message = problems_of(proj, text + "\n")
    assert str(proj.user_config_file) in message
    assert f"{named} is not allowed; allowed: " in message
    assert allowed in message


def test_unknown_keys_are_errors_with_a_suggestion(proj: Project) -> None:
    message = problems_of(proj, "repetition_penalty = 1.1\nprot = 8001\n[service]\nlogdir = 1\n")
    assert "unknown key 'repetition_penalty'" in message
    assert "unknown key 'prot' (did you mean 'port'?)" in message
    assert "unknown key 'service.logdir' (did you mean 'log_dir'?)" in message
    assert "3 problem(s)" in message


def test_conflicting_and_incomplete_settings(proj: Project) -> None:
    text = 'api_key = "a"\napi_key_env = "B"\nkv_group_size = 64\n'
    message = problems_of(proj, text + "prompt_cache_dir = false\nprompt_cache_dir_bytes = 9\n")
    assert "api_key and api_key_env are both set" in message
    assert "kv_group_size is set without kv_bits" in message
    assert "2 problem(s)" in message  # the budget of a disk cache that is off is no problem


def test_a_disk_budget_alone_never_blocks(proj: Project) -> None:
    """prompt_cache_dir_bytes only qualifies prompt_cache_dir: with the disk tier off it has
    no effect (a note in `config check`), never a refusal; a bad value is still one."""
    write_user(proj, 'prompt_cache_dir = false\nprompt_cache_dir_bytes = "2G"\n')
    loaded = config.load(proj)
    assert "prompt_cache_dir_bytes" not in loaded.options
    assert loaded.notes == ("prompt_cache_dir_bytes has no effect: the disk prompt cache is off",)
    checked = run_cli(["config", "check", "--no-probe"], proj.root)
    assert checked.returncode == 0, checked.stderr
    assert "note: prompt_cache_dir_bytes has no effect" in checked.stdout
    assert "--prompt-cache-dir" not in checked.stdout
    bad = problems_of(proj, "prompt_cache_dir = false\nprompt_cache_dir_bytes = 0\n")
    assert "prompt_cache_dir_bytes = 0 is not allowed" in bad
    write_user(proj, "prompt_cache_dir_bytes = 2048\n")  # qualifying the default folder
    loaded = config.load(proj)
    assert loaded.options["prompt_cache_dir_bytes"] == 2048 and loaded.notes == ()


def test_invalid_toml_is_one_clear_error(proj: Project) -> None:
    message = problems_of(proj, "port = \n")
    assert message.startswith(f"{proj.user_config_file} is not valid TOML")


def test_write_atomic_replaces_whole_file_and_keeps_mode(tmp_path: Path) -> None:
    target = tmp_path / "c.toml"
    target.write_text("old")
    target.chmod(0o640)
    atomic.write_atomic(target, "new contents\n")
    assert target.read_text() == "new contents\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert os.listdir(tmp_path) == ["c.toml"]  # no temporary file left behind


def test_cli_config_init_path_show(tmp_path: Path) -> None:
    first = run_cli(["config", "init"], tmp_path)
    assert first.returncode == 0, first.stderr
    assert tomllib.loads((tmp_path / "config.toml").read_text())["port"] == 8000
    again = run_cli(["config", "init"], tmp_path)
    assert again.returncode == 1
    assert "already exists; use --force" in again.stderr
    (tmp_path / "config.toml").write_text('api_key = "sekrit"\n')
    assert run_cli(["config", "init", "--force"], tmp_path).returncode == 0
    assert "sekrit" not in (tmp_path / "config.toml").read_text()
    path = run_cli(["config", "path"], tmp_path)
    assert path.stdout.strip() == str(tmp_path / "config.toml")
    (tmp_path / "config.toml").write_text('api_key = "sekrit"\nport = 8123\n')
    show = run_cli(["config", "show"], tmp_path)
    assert show.returncode == 0, show.stderr
    assert "sekrit" not in show.stdout
    assert "8123" in show.stdout


def test_cli_config_check_reports_every_problem_and_fails(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text("kv_bits = 5\nport = 70000\n")
    result = run_cli(["config", "check", "--no-probe"], tmp_path)
    assert result.returncode == 1
    assert "kv_bits = 5 is not allowed; allowed: one of 2, 3, 4, 6, 8" in result.stderr
    assert "port = 70000 is not allowed; allowed: an integer from 1 to 65535" in result.stderr
    assert "Traceback" not in result.stderr


def test_config_path_is_the_file_even_with_path_keys(proj: Project) -> None:
    """Path-valued keys are resolved against the project without replacing the file's path."""
    path = proj.root / "config.toml"
    path.write_text('model = "tiny"\nprompt_cache_dir = "pc"\nadapter_path = "ad"\n')
    cfg = config.load(proj)
    assert cfg.path == path
    assert cfg.options["prompt_cache_dir"] == str(proj.root / "pc")
    assert cfg.options["adapter_path"] == str(proj.root / "ad")

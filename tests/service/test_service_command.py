"""The server command line built from the config: every key, the model, the API key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mlx_local import config
from mlx_local.errors import UserError
from mlx_local.project import Project
from mlx_local.service import command
from tests.helpers import run_cli

PYTHON = Path("/opt/venv/bin/python")

EVERY_KEY = """
model = "tiny"
host = "0.0.0.0"
port = 9100
allowed_origins = ["http://localhost:*", "https://app.example"]
allowed_hosts = ["mymac.local", "[fe80::1]"]
listen_backlog = 256
served_model_name = "my-id"
max_tokens = 64
prompt_cache_size = 1
prompt_cache_bytes = "8M"
prompt_cache_dir = "pc"
prompt_cache_dir_bytes = "512M"
idle_unload = "30m"
kv_bits = 4
kv_group_size = 32
quantized_kv_start = 128
temp = 0.7
top_p = 0.9
top_k = 40
min_p = 0.05
chat_template = "{{ messages }}"
use_default_chat_template = true
trust_remote_code = true
adapter_path = "adapters"
draft_model = "draft"
num_draft_tokens = 3
decode_concurrency = 4
prompt_concurrency = 2
log_level = "DEBUG"
api_key = "s3cret"
thinking_budget = 64

[chat_template_args]
enable_thinking = false
"""

EXPECTED = [
    ("--host", "0.0.0.0"),
    ("--port", "9100"),
    ("--allowed-origins", "http://localhost:*,https://app.example"),
    ("--allowed-hosts", "mymac.local,[fe80::1]"),
    ("--listen-backlog", "256"),
    ("--served-model-name", "my-id"),
    ("--max-tokens", "64"),
    ("--prompt-cache-size", "1"),
    ("--prompt-cache-bytes", "8388608"),
    ("--prompt-cache-dir", "{root}/pc"),
    ("--prompt-cache-dir-bytes", "512M"),
    ("--idle-unload", "1800"),
    ("--kv-bits", "4"),
    ("--kv-group-size", "32"),
    ("--quantized-kv-start", "128"),
    ("--temp", "0.7"),
    ("--top-p", "0.9"),
    ("--top-k", "40"),
    ("--min-p", "0.05"),
    ("--chat-template", "{{ messages }}"),
    ("--adapter-path", "{root}/adapters"),
    ("--draft-model", "draft"),
    ("--num-draft-tokens", "3"),
    ("--decode-concurrency", "4"),
    ("--prompt-concurrency", "2"),
    ("--log-level", "DEBUG"),
    ("--chat-template-args", '{"enable_thinking":false}'),
    ("--thinking-budget", "64"),
]


@pytest.fixture
def proj(tmp_path: Path) -> Project:
    (tmp_path / "local-models" / "tiny").mkdir(parents=True)
    return Project(tmp_path)


def load(proj: Project, text: str) -> config.Config:
    proj.user_config_file.write_text(text)
    return config.load(proj)


def test_every_key_maps_to_its_server_option(proj: Project) -> None:
    cmd = command.build_command(load(proj, EVERY_KEY), proj, PYTHON, environ={})
    argv = cmd.argv
    model = str(proj.models_dir / "tiny")
    assert argv[:5] == [str(PYTHON), "-m", "mlx_lm.server", "--model", model]
    pairs = dict(zip(argv[5::1], argv[6::1], strict=False))
    for flag, value in EXPECTED:
        assert pairs.get(flag) == value.replace("{root}", str(proj.root)), f"{flag}: {argv}"
    assert "--use-default-chat-template" in argv and "--trust-remote-code" in argv
    assert json.loads(pairs["--chat-template-args"]) == {"enable_thinking": False}
    # Every server key is accounted for: either a flag on the command line or the API key env.
    flags = {key.flag for key in config.SERVER_KEYS.values() if key.flag}
    assert flags <= set(argv)
    assert "s3cret" not in argv
    assert cmd.env == {"MLX_LM_API_KEY": "s3cret"}


def test_display_masks_the_api_key(proj: Project) -> None:
    cmd = command.build_command(load(proj, 'model = "tiny"\napi_key = "s3cret"\n'), proj, PYTHON)
    shown = cmd.display()
    assert "s3cret" not in shown
    assert shown.startswith(f"MLX_LM_API_KEY=******** {PYTHON} -m mlx_lm.server")


def test_false_booleans_and_unset_keys_add_nothing(proj: Project) -> None:
    text = 'model = "tiny"\ntrust_remote_code = false\nprompt_cache_dir = false\n'
    cmd = command.build_command(load(proj, text), proj, PYTHON, environ={})
    assert "--trust-remote-code" not in cmd.argv
    assert "--prompt-cache-dir" not in cmd.argv  # false turns the disk cache off
    assert "--kv-bits" not in cmd.argv
    assert cmd.env == {}


def test_api_key_from_a_named_environment_variable(proj: Project) -> None:
    cfg = load(proj, 'model = "tiny"\napi_key_env = "MY_KEY"\n')
    cmd = command.build_command(cfg, proj, PYTHON, environ={"MY_KEY": "from-env"})
    assert cmd.env == {"MLX_LM_API_KEY": "from-env"}
    with pytest.raises(UserError, match="MY_KEY is not set"):
        command.build_command(cfg, proj, PYTHON, environ={})


def test_model_resolution(proj: Project, tmp_path: Path) -> None:
    local = command.resolve_model("tiny", proj)
    assert (local.kind, local.path) == ("local", proj.models_dir / "tiny")
    elsewhere = tmp_path / "elsewhere model"
    elsewhere.mkdir()
    by_path = command.resolve_model(str(elsewhere), proj)
    assert (by_path.kind, by_path.argument) == ("path", str(elsewhere))
    relative = command.resolve_model("./local-models/tiny", proj)
    assert relative.kind == "path"
    hub = command.resolve_model("mlx-community/Qwen3-0.6B-4bit", proj)
    assert (hub.kind, hub.argument) == ("hub", "mlx-community/Qwen3-0.6B-4bit")
    for missing in ("not-converted", "/no/such/folder", "./nope/x"):
        with pytest.raises(UserError, match="not found"):
            command.resolve_model(missing, proj)


def test_unsupported_flags_against_a_help_text(proj: Project) -> None:
    cmd = command.build_command(load(proj, 'model = "tiny"\nkv_bits = 4\n'), proj, PYTHON)
    help_text = (
        "usage: server.py [--model MODEL] [--host HOST] [--port PORT] [--max-tokens N] "
        "[--prompt-cache-dir D] [--prompt-cache-dir-bytes B]"
    )
    unknown = ["--allowed-origins", "--served-model-name", "--kv-bits"]
    assert command.unsupported_flags(cmd, help_text) == unknown


def test_config_check_prints_the_command_line(proj: Project) -> None:
    proj.user_config_file.write_text('model = "tiny"\napi_key = "s3cret"\nkv_bits = 8\n')
    result = run_cli(["config", "check", "--no-probe"], proj.root)
    assert result.returncode == 0, result.stderr
    assert "s3cret" not in result.stdout
    line = next(x for x in result.stdout.splitlines() if "mlx_lm.server" in x)
    assert line.startswith("MLX_LM_API_KEY=******** ")
    assert f"--model {proj.models_dir / 'tiny'}" in line
    assert "--kv-bits 8" in line and "--served-model-name mlx-local" in line

"""Config side of the local-only defaults: allowed_origins / allowed_hosts reach the server's
command line, a bind beyond loopback needs a key, and a config file holding the key should be
mode 0600 and stays out of service files."""

from __future__ import annotations

import os
import secrets
import shlex
from pathlib import Path

import pytest

from mlx_local import config
from mlx_local.errors import UserError
from mlx_local.project import Project
from mlx_local.service import command, exposure
from tests.helpers import run_cli

PYTHON = Path("/opt/venv/bin/python")


@pytest.fixture
def proj(tmp_path: Path) -> Project:
    (tmp_path / "local-models" / "tiny").mkdir(parents=True)
    return Project(tmp_path)


def argv_of(proj: Project, text: str) -> list[str]:
    proj.user_config_file.write_text(text)
    return command.build_command(config.load(proj), proj, PYTHON, environ={}).argv


def option(argv: list[str], flag: str) -> str | None:
    return argv[argv.index(flag) + 1] if flag in argv else None


def test_default_origins_are_local_only_and_star_only_when_written(proj: Project) -> None:
    default = option(argv_of(proj, 'model = "tiny"\n'), "--allowed-origins")
    assert default is not None
    origins = default.split(",")
    assert "*" not in origins
    assert {"http://localhost:*", "http://127.0.0.1:*", "http://[::1]:*"} <= set(origins)
    for origin in origins:
        assert origin.split("://")[1].rsplit(":", 1)[0] in ("localhost", "127.0.0.1", "[::1]")
    assert option(argv_of(proj, 'model = "tiny"\n'), "--allowed-hosts") is None

    text = 'model = "tiny"\nallowed_origins = ["*"]\nallowed_hosts = ["mymac.local", "10.0.0.2"]\n'
    argv = argv_of(proj, text)
    assert option(argv, "--allowed-origins") == "*"
    assert option(argv, "--allowed-hosts") == "mymac.local,10.0.0.2"
    # No origin at all is a choice too: the server then gets an empty list, not its default "*".
    assert (
        option(argv_of(proj, 'model = "tiny"\nallowed_origins = []\n'), "--allowed-origins") == ""
    )


@pytest.mark.parametrize(
    "line",
    [
        'allowed_origins = "http://localhost:*"',
        'allowed_origins = ["localhost:8080"]',
        'allowed_origins = ["http://a.example,http://b.example"]',
        'allowed_origins = ["http://localhost:*/path"]',
        'allowed_origins = ["http://localhost:8080\\n"]',
        "allowed_origins = [1]",
        'allowed_hosts = ["a b"]',
        'allowed_hosts = ["a,b"]',
        'allowed_hosts = "mymac.local"',
    ],
)
def test_bad_origins_and_hosts_name_the_key(proj: Project, line: str) -> None:
    proj.user_config_file.write_text(f'model = "tiny"\n{line}\n')
    with pytest.raises(
        UserError, match=line.split(" =")[0] + " = .* is not allowed; allowed: a list"
    ):
        config.load(proj)


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.0.0.2", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("LOCALHOST", True),
        ("0.0.0.0", False),
        ("::", False),
        ("", False),
        ("192.168.1.20", False),
        ("10.0.0.5", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert exposure.is_loopback(host) is loopback


def config_check(proj: Project, text: str, env: dict[str, str] | None = None):
    proj.user_config_file.write_text(text)
    os.chmod(proj.user_config_file, 0o600)
    return run_cli(["config", "check", "--no-probe"], proj.root, env=env)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20"])
def test_config_check_refuses_a_bind_beyond_loopback_without_a_key(
    proj: Project, host: str
) -> None:
    result = config_check(proj, f'model = "tiny"\nhost = "{host}"\n')
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"host = {host!r}" in lines[0] and "api_key_env" in lines[0]

    key = secrets.token_hex(8)
    text = f'model = "tiny"\nhost = "{host}"\napi_key_env = "MY_KEY"\n'
    result = config_check(proj, text, env={"MY_KEY": key})
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("plain HTTP") == 1
    assert key not in result.stdout + result.stderr


def test_loopback_needs_no_key_and_warns_nothing(proj: Project) -> None:
    for host in ("127.0.0.1", "localhost", "::1"):
        result = config_check(proj, f'model = "tiny"\nhost = "{host}"\n')
        assert result.returncode == 0, result.stderr
        assert "warning" not in result.stdout + result.stderr


def test_a_config_file_holding_the_key_should_be_0600(proj: Project) -> None:
    key = secrets.token_hex(8)
    result = config_check(proj, f'model = "tiny"\napi_key = "{key}"\n')
    assert result.returncode == 0 and "chmod" not in result.stdout
    os.chmod(proj.user_config_file, 0o644)
    result = run_cli(["config", "check", "--no-probe"], proj.root)
    assert result.returncode == 0, result.stderr
    warning = next(line for line in result.stdout.splitlines() if "warning" in line)
    assert "holds api_key" in warning and "0644" in warning
    assert f"run: chmod 600 {shlex.quote(str(proj.user_config_file))}" in warning
    assert key not in result.stdout + result.stderr
    # A readable file without a key is no problem.
    proj.user_config_file.write_text('model = "tiny"\n')
    result = run_cli(["config", "check", "--no-probe"], proj.root)
    assert "warning" not in result.stdout


def test_config_init_writes_0600(proj: Project) -> None:
    result = run_cli(["config", "init"], proj.root)
    assert result.returncode == 0, result.stderr
    assert proj.user_config_file.stat().st_mode & 0o777 == 0o600


def test_a_key_in_the_config_file_stays_out_of_unit_and_plist(proj: Project) -> None:
    key = secrets.token_hex(12)
    proj.user_config_file.write_text(f'model = "tiny"\napi_key = "{key}"\n')
    for kind, marker in (("systemd", "ExecStart="), ("launchd", "<plist")):
        result = run_cli(["install-service", "--dry-run", "--kind", kind], proj.root)
        assert result.returncode == 0, result.stderr
        assert marker in result.stdout
        assert key not in result.stdout + result.stderr
    result = run_cli(["config", "show"], proj.root)
    assert result.returncode == 0 and "********" in result.stdout and key not in result.stdout

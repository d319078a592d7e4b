"""The service beyond loopback, for real: `mlx-local start`/`serve`/`config check` refuse
host = "0.0.0.0" without an API key; with one it serves (and needs the key) after one
warning, and the key shows up in no process list, log, status output, unit or plist."""

from __future__ import annotations

import http.client
import json
import secrets
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from mlx_local.service import process
from tests.conftest import PatchedRuntime
from tests.helpers import ServiceProject, make_service_project

pytestmark = pytest.mark.slow

KEY_ENV = "MLX_LOCAL_TEST_SECRET"


def make_project(
    base: Path, runtime: PatchedRuntime, demo_model: Path, extra: str
) -> ServiceProject:
    """A service project on the demo model (4 tokens an answer) with `extra` settings."""
    return make_service_project(base, runtime.root, runtime.python, demo_model, extra, 4)


def lan_address() -> str | None:
    """This machine's address on its default route (no packet is sent), if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(("10.255.255.255", 9))
        except OSError:
            return None
        address = sock.getsockname()[0]
    return None if address.startswith("127.") or address == "0.0.0.0" else address


def call(
    address: str, port: int, path: str, key: str | None = None, **headers: str
) -> tuple[int, dict[str, str]]:
    """GET address:port/path (Host: address:port unless given) -> status and headers."""
    connection = http.client.HTTPConnection(address, port, timeout=60)
    try:
        if key:
            headers["Authorization"] = f"Bearer {key}"
        connection.request("GET", path, headers=headers)
        reply = connection.getresponse()
        reply.read()
        return reply.status, {k.lower(): v for k, v in reply.getheaders()}
    finally:
        connection.close()


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode != 0, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_a_bind_beyond_loopback_without_a_key_is_refused(
    tmp_path: Path, patched_runtime: PatchedRuntime, demo_model: Path
) -> None:
    proj = make_project(tmp_path, patched_runtime, demo_model, 'host = "0.0.0.0"')
    for command in (["config", "check"], ["start"], ["serve"]):
        line = one_error_line(proj.cli(*command))
        assert "host = '0.0.0.0'" in line and "set api_key_env" in line, command
    assert not process.port_in_use("0.0.0.0", proj.port)
    assert not (proj.root / ".mlx-local" / "server.pid").exists()
    assert not process.healthy("127.0.0.1", proj.port)


@pytest.fixture
def lan_service(
    tmp_path: Path, patched_runtime: PatchedRuntime, demo_model: Path
) -> Iterator[tuple[ServiceProject, str, subprocess.CompletedProcess[str]]]:
    """`mlx-local start` on 0.0.0.0 with a key from the environment; DEBUG logging."""
    key = f"sk-{secrets.token_hex(16)}"
    extra = f'host = "0.0.0.0"\napi_key_env = "{KEY_ENV}"\nlog_level = "DEBUG"'
    proj = make_project(tmp_path, patched_runtime, demo_model, extra)
    proj.env[KEY_ENV] = key
    started = proj.cli("start")
    try:
        yield proj, key, started
    finally:
        proj.cli("stop")


def test_with_a_key_it_serves_beyond_loopback_and_needs_the_key(
    lan_service: tuple[ServiceProject, str, subprocess.CompletedProcess[str]],
) -> None:
    proj, key, started = lan_service
    assert started.returncode == 0, started.stdout + started.stderr
    warnings = [line for line in started.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "plain HTTP" in warnings[0], started.stderr
    port = proj.port
    assert call("127.0.0.1", port, "/health")[0] == 200
    assert call("127.0.0.1", port, "/v1/models")[0] == 401
    assert call("127.0.0.1", port, "/v1/models", key="wrong")[0] == 401
    assert call("127.0.0.1", port, "/v1/models", key=key)[0] == 200
    # Still no DNS rebinding and no foreign pages, key or not.
    assert call("127.0.0.1", port, "/health", Host="evil.example")[0] == 403
    assert call("127.0.0.1", port, "/v1/models", key, Host="evil.example")[0] == 403
    assert call("127.0.0.1", port, "/v1/models", key, Origin="https://evil.example")[0] == 403
    status, headers = call("127.0.0.1", port, "/v1/models", key, Origin="http://localhost:3000")
    assert status == 200 and headers["access-control-allow-origin"] == "http://localhost:3000"
    address = lan_address()
    if address is not None:  # from the LAN side: any IP address is a name of a 0.0.0.0 server
        assert call(address, port, "/health")[0] == 200
        assert call(address, port, "/v1/models")[0] == 401
        assert call(address, port, "/v1/models", key=key)[0] == 200


def test_the_key_is_in_no_process_list_log_status_unit_or_plist(
    lan_service: tuple[ServiceProject, str, subprocess.CompletedProcess[str]],
) -> None:
    proj, key, started = lan_service
    assert started.returncode == 0, started.stdout + started.stderr
    connection = http.client.HTTPConnection("127.0.0.1", proj.port, timeout=120)
    body = {"messages": [{"role": "user", "content": "logged-body-3a7f"}], "max_tokens": 2}
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    connection.request("POST", "/v1/chat/completions", json.dumps(body), headers)
    assert connection.getresponse().status == 200
    connection.close()

    processes = subprocess.run(
        ["ps", "-ww", "-eo", "args"], capture_output=True, text=True, check=True
    ).stdout
    assert f"--port {proj.port}" in processes and "mlx_lm.server" in processes
    assert key not in processes

    outputs = {"start": started.stdout + started.stderr}
    for command in (
        ["status"],
        ["status", "--json"],
        ["config", "show"],
        ["config", "check"],
        ["logs", "-n", "1000"],
        ["install-service", "--dry-run", "--kind", "systemd"],
        ["install-service", "--dry-run", "--kind", "launchd"],
    ):
        result = proj.cli(*command)
        assert result.returncode == 0, (command, result.stderr)
        outputs[" ".join(command)] = result.stdout + result.stderr
    assert "MLX_LM_API_KEY=********" in outputs["config check"]
    assert "ExecStart=" in outputs["install-service --dry-run --kind systemd"]
    assert "<plist" in outputs["install-service --dry-run --kind launchd"]
    for name, text in outputs.items():
        assert key not in text, name

    files = [p for p in (proj.root / "logs").rglob("*") if p.is_file()]
    files += [p for p in (proj.root / ".mlx-local").rglob("*") if p.is_file()]
    log_text = (proj.root / "logs" / "server.log").read_text()
    assert "logged-body-3a7f" in log_text  # DEBUG logging shows request bodies, not headers
    for path in files:
        assert key.encode() not in path.read_bytes(), path

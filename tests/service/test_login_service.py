"""The login service on both managers, with the real server on the demo model: install-service,
start, stop, restart, status and the stored key, each test once per manager.

- launchd: the stand-in launchd (tests/standin/launchd.py: a stand-in, not launchd; it models
  launchd's documented and reported behaviour, see its docstring) and the stand-in `security`
  for the Keychain. The real launchctl and Keychain run on macOS only (test_macos_service.py).
- systemd: a real, private `systemd --user` (tests/service/systemd_helpers.py), skipped where
  it cannot start.
"""

from __future__ import annotations

import http.client
import os
import secrets
import shutil
import signal
import stat
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mlx_local.service import process
from tests.conftest import PatchedRuntime
from tests.helpers import ServiceProject, make_service_project
from tests.service import systemd_helpers
from tests.service.launchd_helpers import StandInLaunchd, standin_launchd
from tests.service.systemd_helpers import UserManager, user_manager

pytestmark = pytest.mark.slow
Session = StandInLaunchd | UserManager


@pytest.fixture(params=["launchd", "systemd"])
def session(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Session]:
    """A logged-in user: the stand-in launchd, or a private systemd user manager."""
    if request.param == "launchd":
        with standin_launchd(tmp_path) as logged_in:
            yield logged_in
        return
    if (why := systemd_helpers.can_run()) is not None:
        pytest.skip(why)
    with user_manager(tmp_path) as manager:
        if manager is None:
            pytest.skip("systemd --user did not start here")
        yield manager


@pytest.fixture
def agent(
    tmp_path: Path, patched_runtime: PatchedRuntime, demo_model: Path, session: Session
) -> ServiceProject:
    """A project on the demo model whose login service belongs to the session."""
    proj = make_service_project(tmp_path, patched_runtime.root, patched_runtime.python, demo_model)
    proj.env.pop("MLX_LOCAL_SERVICE_DIR")  # the session's own LaunchAgents / systemd/user
    proj.env.update(session.env)
    return proj


def edit_config(proj: ServiceProject, old: str, new: str) -> None:
    path = proj.root / "config.toml"
    text = path.read_text()
    assert old in text, text
    path.write_text(text.replace(old, new))


def running_pid(session: Session) -> int:
    pid = session.pid()
    assert pid is not None, f"the {session.kind} service is not running"
    return pid


def command_line(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def models_status(port: int, key: str | None = None) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        connection.request("GET", "/v1/models", headers=headers)
        reply = connection.getresponse()
        reply.read()
        return reply.status
    finally:
        connection.close()


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_restart_and_a_changed_install_leave_the_service_loaded(
    session: Session, agent: ServiceProject
) -> None:
    """Issue 22 #1: with launchd, each bootstrap follows a bootout inside launchd's cleanup
    window, where a bare bootstrap fails with 5; restart waits launchd out."""
    installed = agent.cli("install-service")
    assert installed.returncode == 0, installed.stdout + installed.stderr
    pid = running_pid(session)
    for _ in range(2):
        restarted = agent.cli("restart")
        assert restarted.returncode == 0, restarted.stdout + restarted.stderr
        assert process.healthy("127.0.0.1", agent.port)
        new_pid = running_pid(session)
        assert new_pid != pid
        pid = new_pid
    edit_config(agent, "stop_timeout = 10", "stop_timeout = 7")
    changed = agent.cli("install-service")
    assert changed.returncode == 0, changed.stdout + changed.stderr
    assert "wrote" in changed.stdout and session.stop_seconds() == 7
    assert running_pid(session) != pid and process.healthy("127.0.0.1", agent.port)
    if isinstance(session, StandInLaunchd):  # three bootouts, each waited out
        assert session.log().count("scheduling cleanup in") == 3


def test_an_unchanged_install_leaves_the_running_service_alone(
    session: Session, agent: ServiceProject
) -> None:
    """Issue 22 #2."""
    assert agent.cli("install-service").returncode == 0
    instance = session.instance()
    again = agent.cli("install-service")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "unchanged" in again.stdout and "left alone" in again.stdout
    assert session.instance() == instance and process.healthy("127.0.0.1", agent.port)


def test_start_and_restart_pass_model_and_fallback_demo_to_the_service(
    session: Session, agent: ServiceProject, demo_model: Path
) -> None:
    """Issue 22 #3: --model and --fallback-demo reach the installed service."""
    other = agent.root / "local-models" / "other"
    shutil.copytree(demo_model, other)
    assert agent.cli("install-service").returncode == 0
    restarted = agent.cli("restart", "--model", "other")
    assert restarted.returncode == 0, restarted.stdout + restarted.stderr
    assert f"--model {other.resolve()} " in command_line(running_pid(session))
    assert agent.status()["model"] == str(other.resolve())
    busy = agent.cli("start", "--model", "demo")
    assert "mlx-local restart --model demo" in one_error_line(busy)
    back = agent.cli("restart")
    assert back.returncode == 0, back.stdout + back.stderr
    demo = (agent.root / "local-models" / "demo").resolve()
    assert f"--model {demo} " in command_line(running_pid(session))

    edit_config(agent, 'model = "demo"', 'model = "mlx-community/not-cached-here"')
    refused = agent.cli("restart")
    assert "--fallback-demo" in one_error_line(refused)
    assert process.healthy("127.0.0.1", agent.port)  # refused before stopping anything
    fallback = agent.cli("restart", "--fallback-demo")
    assert fallback.returncode == 0, fallback.stdout + fallback.stderr
    assert "serving the demo model" in fallback.stderr
    line = command_line(running_pid(session))
    assert "demo-tiny-qwen3" in line and "not-cached-here" not in line


def break_weights(model: Path) -> None:
    """Keep the safetensors header (the checks at start read it), drop the tensors' bytes."""
    weights = model / "model.safetensors"
    data = weights.read_bytes()
    header = struct.unpack("<Q", data[:8])[0]
    weights.write_bytes(data[: 8 + header + 16])


def test_a_crash_loop_is_reported_at_once_with_both_logs(
    session: Session, agent: ServiceProject, demo_model: Path
) -> None:
    """Issue 22 #4: a server that cannot load its model exits; launchd would restart it every
    30 s, systemd every 5. install-service and start say so within seconds, not after
    start_timeout, with the server's log and the service's own output (launchd's
    StandardErrorPath; systemd's StandardOutput), and leave nothing crash-looping."""
    broken = agent.root / "local-models" / "broken"
    shutil.copytree(demo_model, broken)
    break_weights(broken)
    edit_config(agent, 'model = "demo"', 'model = "broken"')
    edit_config(agent, "start_timeout = 180", "start_timeout = 60")
    for command in ("install-service", "start"):
        began = time.monotonic()
        failed = agent.cli(command)
        elapsed = time.monotonic() - began
        assert failed.returncode == 1, failed.stdout + failed.stderr
        assert elapsed < 30, (command, elapsed)
        assert "installed and started" not in failed.stdout
        text = failed.stderr
        assert "exited with code 1" in text and "crash loop" in text, text
        assert "invalid data offsets" in text  # server.log's tail: the real error
        assert str(agent.root / "logs" / "service.log") in text
        assert not session.loaded() and not session.enabled()
        assert not process.healthy("127.0.0.1", agent.port)


def test_api_key_env_is_refused_for_the_login_service(
    session: Session, agent: ServiceProject
) -> None:
    """Issue 22 #5: launchd and systemd do not pass the shell's variables, so a service on
    api_key_env would crash-loop; install-service, start and restart refuse it instead."""
    agent.env["MLX_LOCAL_TEST_KEY"] = "sk-from-the-shell-0123456789"
    config = agent.root / "config.toml"
    plain = config.read_text()
    config.write_text('api_key_env = "MLX_LOCAL_TEST_KEY"\n' + plain)
    line = one_error_line(agent.cli("install-service"))
    assert "api_key_env" in line and "mlx-local key set" in line
    assert not session.loaded() and not session.service_file.exists()
    assert agent.cli("config", "check", "--no-probe").returncode == 0  # serve in a shell: fine

    config.write_text(plain)
    assert agent.cli("install-service").returncode == 0
    assert agent.cli("stop").returncode == 0
    config.write_text('api_key_env = "MLX_LOCAL_TEST_KEY"\n' + plain)
    for command in ("start", "restart"):
        line = one_error_line(agent.cli(command))
        assert "api_key_env" in line and "mlx-local key set" in line, command
    assert not session.loaded()


def test_the_stored_key_reaches_the_service(session: Session, agent: ServiceProject) -> None:
    """`key set` keeps the key the platform's way (the Keychain; a 0600 systemd credential
    outside the project), `serve` reads it at start under the service; rotation and removal."""
    key = f"sk-{secrets.token_hex(16)}"
    stored = agent.cli("key", "set", stdin=key + "\n")
    assert stored.returncode == 0, stored.stdout + stored.stderr
    assert key not in stored.stdout + stored.stderr and "api_key_stored = true" in stored.stderr
    assert key in session.key_file.read_text()
    assert stat.S_IMODE(session.key_file.stat().st_mode) == 0o600
    assert not session.key_file.is_relative_to(agent.root)
    shown = agent.cli("key", "show")
    assert shown.returncode == 0 and key not in shown.stdout and key[:5] in shown.stdout
    assert agent.cli("key", "show", "--reveal").stdout.strip() == key

    config = agent.root / "config.toml"
    config.write_text("api_key_stored = true\n" + config.read_text())
    installed = agent.cli("install-service")
    assert installed.returncode == 0, installed.stdout + installed.stderr
    assert models_status(agent.port) == 401
    assert models_status(agent.port, key) == 200
    pid = running_pid(session)
    assert key not in command_line(pid)
    assert key.encode() not in session.service_file.read_bytes()
    for path in (agent.root / "logs").iterdir():
        assert key.encode() not in path.read_bytes(), path
    if isinstance(session, UserManager):  # serve read systemd's private copy of the credential
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert any(entry.startswith(b"CREDENTIALS_DIRECTORY=") for entry in environ)

    rotated = f"sk-{secrets.token_hex(16)}"
    rotating = agent.cli("key", "set", stdin=rotated + "\n")
    assert "mlx-local restart" in rotating.stderr
    assert agent.cli("restart").returncode == 0
    assert models_status(agent.port, key) == 401
    assert models_status(agent.port, rotated) == 200

    assert agent.cli("key", "rm").returncode == 0
    assert agent.cli("key", "show").returncode == 1  # no key stored
    line = one_error_line(agent.cli("restart"))
    assert "api_key_stored" in line and "mlx-local key set" in line
    assert process.healthy("127.0.0.1", agent.port)  # refused before stopping


def test_status_after_a_clean_exit_says_stopped_exited_0(
    session: Session, agent: ServiceProject
) -> None:
    """Issue 22 #6. SIGTERM makes the server exit; KeepAlive {SuccessfulExit=false} and
    Restart=on-failure leave a clean exit alone and restart after any other. At the pin the
    server sometimes aborts at shutdown (SIGABRT, /work/team/mac-server-abort.md): then status
    must say crashed, and the next try waits for the restart."""
    assert agent.cli("install-service").returncode == 0
    for _ in range(10):
        pid = running_pid(session)
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while session.pid() == pid or not (session.settled() or session.pid()):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        if session.pid() is None:  # ended: for good, or until its manager restarts it
            state = agent.status()
            if session.exited_cleanly():
                assert state["state"] == "stopped" and state["last_exit"] == "exited 0", state
                assert "stopped (exited 0)" in agent.cli("status").stdout
                return
            assert state["state"] == "crashed" and "restarts it" in state["detail"], state
            session.restart_after_failure()
        assert process.wait_healthy("127.0.0.1", agent.port, 60, lambda: True)
    pytest.fail("the server never exited 0 on SIGTERM in 10 tries")


def test_a_stopped_service_stays_stopped_across_a_relogin(
    session: Session, agent: ServiceProject
) -> None:
    """Item 4, the same on both: `stop` disables the service (launchctl disable persists
    across logins and boots; systemctl disable drops it from default.target), `start` enables
    it again; a login starts only what is enabled."""
    assert agent.cli("install-service").returncode == 0
    stopped = agent.cli("stop")
    assert stopped.returncode == 0 and "stopped" in stopped.stdout
    assert not session.loaded() and not session.enabled()
    assert not process.port_in_use("127.0.0.1", agent.port)
    session.logout()
    assert session.login()
    assert not session.loaded()
    state = agent.status()
    assert state["state"] == "stopped" and "stays stopped at login" in state["detail"]

    started = agent.cli("start")
    assert started.returncode == 0, started.stdout + started.stderr
    assert session.enabled()
    session.logout()
    assert session.login()
    assert process.wait_healthy("127.0.0.1", agent.port, 60, lambda: True)
    assert agent.status()["state"] == "running"

    removed = agent.cli("uninstall-service")
    assert removed.returncode == 0, removed.stdout + removed.stderr
    assert not session.loaded() and not session.service_file.exists()
    assert agent.status()["manager"] == "process"

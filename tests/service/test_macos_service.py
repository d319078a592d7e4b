"""On macOS only: the login service against the real launchctl and the real login keychain,
which test_login_service.py replaces with stand-ins on Linux. Nothing of the developer's own is
touched: the agent's plist goes to a temporary LaunchAgents folder, and both tests skip when a
mlx-local agent is loaded or a key is stored already."""

from __future__ import annotations

import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from mlx_local.service import install, keystore, launchctl, process
from tests.conftest import PatchedRuntime
from tests.helpers import make_service_project, run_cli

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(sys.platform != "darwin", reason="launchctl and the Keychain are macOS's"),
]


def test_install_restart_stop_start_uninstall_with_the_real_launchctl(
    tmp_path: Path, patched_runtime: PatchedRuntime, demo_model: Path
) -> None:
    if launchctl.state() is not None:
        pytest.skip(f"{launchctl.target()} is loaded here already; not touching it")
    proj = make_service_project(tmp_path, patched_runtime.root, patched_runtime.python, demo_model)
    proj.env[install.DIR_ENV] = str(tmp_path / "LaunchAgents")
    try:
        installed = proj.cli("install-service")
        assert installed.returncode == 0, installed.stdout + installed.stderr
        assert process.healthy("127.0.0.1", proj.port)
        for _ in range(2):  # each bootstrap right after a bootout: launchd's cleanup window
            restarted = proj.cli("restart")
            assert restarted.returncode == 0, restarted.stdout + restarted.stderr
            assert process.healthy("127.0.0.1", proj.port)
        pid = launchctl.state().pid
        again = proj.cli("install-service")
        assert again.returncode == 0 and "left alone" in again.stdout
        assert launchctl.state().pid == pid
        assert proj.cli("stop").returncode == 0
        assert launchctl.state() is None and not launchctl.enabled()
        assert proj.status()["state"] == "stopped"
        assert proj.cli("start").returncode == 0 and launchctl.enabled()
        assert proj.status()["state"] == "running"
    finally:
        proj.cli("uninstall-service")
    assert launchctl.state() is None
    assert not (tmp_path / "LaunchAgents" / "com.local.mlx-local.plist").exists()


def test_key_set_show_rm_with_the_real_keychain(tmp_path: Path) -> None:
    store = keystore.Keychain()
    if store.read() is not None:
        pytest.skip(f"a key is stored in {store.where} already; not touching it")
    key = f"sk-{secrets.token_hex(16)}"
    env = {install.DIR_ENV: str(tmp_path / "LaunchAgents")}
    try:
        stored = run_cli(["key", "set"], tmp_path, env=env, stdin=key + "\n")
        assert stored.returncode == 0, stored.stderr
        found = subprocess.run(
            ["security", "find-generic-password", "-s", keystore.KEYCHAIN_SERVICE]
            + ["-a", keystore.KEYCHAIN_ACCOUNT, "-w"],
            capture_output=True,
            text=True,
        )
        assert found.stdout.strip() == key
        shown = run_cli(["key", "show"], tmp_path, env=env)
        assert key not in shown.stdout and key[:5] in shown.stdout
    finally:
        removed = run_cli(["key", "rm"], tmp_path, env=env)
    assert removed.returncode == 0 and store.read() is None

"""start / status / stop / logs / serve against the real patched server on the demo model.

The background server is the pid-file kind (no launchd/systemd here): a crash (kill -9), a
port already in use, a stop of a server that is not running, a startup failure with the log.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from mlx_local import processes
from tests.helpers import VENV_BIN, ServiceProject, make_service_project, run_cli


@pytest.fixture
def service_project(tmp_path: Path, patched_runtime, demo_model: Path) -> Iterator[ServiceProject]:
    proj = make_service_project(
        tmp_path, patched_runtime.root, patched_runtime.python, demo_model, 'api_key = "k-123"'
    )
    yield proj
    proj.cli("stop")  # never leave a server behind


def get(url: str, key: str | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url)
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


@pytest.mark.slow
def test_start_status_stop_status(service_project: ServiceProject) -> None:
    proj = service_project
    started = proj.cli("start")
    assert started.returncode == 0, started.stdout + started.stderr
    pid = int(proj.pid_file.read_text())
    assert f"started (pid {pid}) via process: http://127.0.0.1:{proj.port}/v1" in started.stdout

    state = proj.status()
    assert state["state"] == "running" and state["health"] == "ok"
    assert state["pid"] == pid and state["manager"] == "process"
    assert state["served_model_name"] == "mlx-local"
    assert state["model"] == str((proj.root / "local-models" / "demo").resolve())
    assert state["rss_bytes"] > 20 * 2**20 and state["uptime_seconds"] >= 0
    panel = proj.cli("status").stdout
    for label in ("state", "pid", "uptime", "health", "served id", "memory (RSS)"):
        assert label in panel

    # The API key reaches the server through its environment, never its command line.
    info = processes.process_info(pid)
    assert info is not None and "mlx_lm.server" in info.command and "k-123" not in info.command
    base = f"http://127.0.0.1:{proj.port}"
    assert get(f"{base}/v1/models")[0] == 401
    code, models = get(f"{base}/v1/models", key="k-123")
    assert code == 200 and [m["id"] for m in models["data"]] == ["mlx-local"]

    again = proj.cli("start")
    assert again.returncode == 0 and f"already running (pid {pid})" in again.stdout
    logs = proj.cli("logs", "-n", "200")
    assert logs.returncode == 0 and "GET /health" in logs.stdout

    stopped = proj.cli("stop")
    assert stopped.returncode == 0 and f"stopped (pid {pid})" in stopped.stdout
    assert not proj.pid_file.exists()
    assert processes.process_info(pid) is None
    state = proj.status()
    assert (state["state"], state["pid"], state["health"]) == ("stopped", None, "down")
    time.sleep(1)
    assert proj.status()["state"] == "stopped"  # nothing brings it back

    not_running = proj.cli("stop")
    assert not_running.returncode == 0 and not_running.stdout.strip() == "not running"


@pytest.mark.slow
def test_crash_is_detected_and_cleaned_up(service_project: ServiceProject) -> None:
    proj = service_project
    assert proj.cli("start").returncode == 0
    pid = int(proj.pid_file.read_text())
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while processes.process_info(pid) is not None and time.monotonic() < deadline:
        time.sleep(0.1)
    state = proj.status()
    assert state["state"] == "crashed" and state["pid"] == pid
    assert "stale" in state["detail"]
    cleaned = proj.cli("stop")
    assert cleaned.returncode == 0 and "removed the stale pid file" in cleaned.stdout
    assert not proj.pid_file.exists()
    assert proj.status()["state"] == "stopped"


@pytest.mark.slow
def test_port_in_use_is_one_clear_line(service_project: ServiceProject) -> None:
    proj = service_project
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", proj.port))
        squatter.listen()
        for command in ("start", "serve"):
            result = proj.cli(command)
            assert result.returncode == 1
            errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
            assert errors == [
                f"error: port {proj.port} on 127.0.0.1 is already in use by another program; "
                f"stop it or set another port in {proj.root / 'config.toml'}"
            ]
            assert "Traceback" not in result.stderr
    assert not proj.pid_file.exists()


@pytest.mark.slow
def test_startup_failure_shows_the_log(tmp_path: Path, patched_runtime, demo_model: Path) -> None:
    proj = make_service_project(tmp_path, patched_runtime.root, patched_runtime.python, demo_model)
    broken = proj.root / "local-models" / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "no-such-architecture"}')
    config = proj.root / "config.toml"
    config.write_text(config.read_text().replace('model = "demo"', 'model = "broken"'))
    result = proj.cli("start")
    assert result.returncode == 1
    assert "error: the server exited during startup" in result.stderr
    assert "last lines of" in result.stderr and "No safetensors found" in result.stderr
    assert not proj.pid_file.exists()


@pytest.mark.slow
def test_serve_fallback_demo_prints_a_working_curl_line(
    tmp_path: Path, patched_runtime, demo_model: Path
) -> None:
    """`serve --fallback-demo` with an unreachable hub model: one warning, the demo model built
    and served in the foreground, then the base URL and a curl line that really works."""
    proj = make_service_project(tmp_path, patched_runtime.root, patched_runtime.python, demo_model)
    config = proj.root / "config.toml"
    config.write_text(config.read_text().replace('model = "demo"', 'model = "org/not-cached"'))
    stderr_path = tmp_path / "serve.stderr"
    with stderr_path.open("w") as stderr_file:
        server = subprocess.Popen(
            [str(VENV_BIN / "mlx-local"), "serve", "--fallback-demo"],
            env={**os.environ, "MLX_LOCAL_HOME": str(proj.root), **proj.env},
            stdout=subprocess.PIPE,
            stderr=stderr_file,
            text=True,
        )
    try:
        lines = []
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and server.poll() is None:
            line = server.stdout.readline()
            lines.append(line)
            if line.strip().startswith("curl "):
                break
        assert any(f"at http://127.0.0.1:{proj.port}/v1" in line for line in lines), lines
        curl = lines[-1].strip()
        reply = subprocess.run(curl, shell=True, capture_output=True, text=True, timeout=120)
        body = json.loads(reply.stdout)
        assert body["model"] == "mlx-local" and body["choices"][0]["message"]["role"]
        # `start` and `stop` see the terminal's server and say what to do.
        start = proj.cli("start")
        assert start.returncode == 1 and "already answers at" in start.stderr
        stop = proj.cli("stop")
        assert stop.returncode == 0 and "stop it there with Ctrl-C" in stop.stdout
        assert proj.status()["manager"] == "foreground"
    finally:
        server.send_signal(signal.SIGTERM)  # exec: the pid we started is the server itself
        server.wait(timeout=30)
    stderr = stderr_path.read_text()
    warnings = [line for line in stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "org/not-cached" in warnings[0] and "demo" in warnings[0]
    assert (proj.root / "local-models" / "demo-tiny-qwen3" / "config.json").is_file()


def test_clear_errors_before_anything_starts(tmp_path: Path, demo_model: Path) -> None:
    """No checkout, a missing model, an unreachable hub model: one line each, nothing started."""
    root = tmp_path / "project"
    (root / "local-models").mkdir(parents=True)
    env = {"MLX_LOCAL_PYTHON": sys.executable, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    (root / "config.toml").write_text('model = "demo"\n')
    no_checkout = run_cli(["start"], root, env=env)
    assert no_checkout.returncode == 1
    assert (
        no_checkout.stderr.strip()
        == f"error: {root / 'mlx-lm-repo'} does not exist: run setup-repo first"
    )

    (root / "mlx-lm-repo").mkdir()
    bare = tmp_path / "bare-venv"  # a runtime without mlx_lm
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True)
    env["MLX_LOCAL_PYTHON"] = str(bare / "bin" / "python")
    no_mlx = run_cli(["start"], root, env=env)
    assert (
        no_mlx.stderr.strip()
        == f"error: {env['MLX_LOCAL_PYTHON']} has no mlx_lm installed: run setup-repo"
    )

    python = tmp_path / "fake-runtime" / "python"
    python.parent.mkdir()
    python.write_text("#!/bin/sh\nexit 0\n")  # answers the mlx_lm probe with "found"
    python.chmod(0o755)
    env["MLX_LOCAL_PYTHON"] = str(python)
    missing = run_cli(["start"], root, env=env)
    assert missing.returncode == 1
    assert missing.stderr.startswith("error: model 'demo' not found")

    (root / "config.toml").write_text('model = "org/not-cached"\n')
    offline = run_cli(["start"], root, env=env)
    assert offline.returncode == 1
    assert "not in the local Hugging Face cache and the hub cannot be reached" in offline.stderr
    assert "--fallback-demo" in offline.stderr
    assert not (root / ".mlx-local" / "server.pid").exists()


def test_terminate_escalates_to_sigkill(tmp_path: Path) -> None:
    stubborn = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "print('ready', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert stubborn.stdout.readline().strip() == "ready"
    reaper = threading.Thread(target=stubborn.wait)
    reaper.start()
    assert processes.terminate(stubborn.pid, timeout=1) == "killed"
    reaper.join(timeout=10)
    assert stubborn.returncode == -signal.SIGKILL
    assert processes.terminate(stubborn.pid, timeout=1) == "gone"


def test_terminating_a_group_leaves_no_child_behind() -> None:
    """A launcher that dies on SIGTERM with a child that ignores it (mlx.launch and a rank):
    with group=True the child is killed too; without, it would be orphaned."""
    script = "trap '' TERM; sleep 300 & echo $!; trap - TERM; wait"
    launcher = subprocess.Popen(
        ["sh", "-c", script], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    child = int(launcher.stdout.readline())
    reaper = threading.Thread(target=launcher.wait)
    reaper.start()
    assert processes.process_info(child) is not None
    assert processes.terminate(launcher.pid, timeout=5, group=True) == "terminated"
    reaper.join(timeout=10)
    deadline = time.monotonic() + 5
    while processes.process_info(child) is not None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert processes.process_info(child) is None


@pytest.mark.slow
def test_config_check_probes_the_patched_server(
    tmp_path: Path, patched_runtime, demo_model: Path
) -> None:
    """Every option the config can produce is one the patched server's --help lists."""
    extra = (
        "prompt_cache_size = 1\nkv_bits = 4\nkv_group_size = 32\nquantized_kv_start = 0\n"
        'temp = 0.5\ntop_p = 0.9\ntop_k = 5\nmin_p = 0.1\nlog_level = "INFO"\n'
        "decode_concurrency = 2\nprompt_concurrency = 2\nnum_draft_tokens = 2\n"
        'api_key = "k"\n[chat_template_args]\nenable_thinking = false\n'
    )
    proj = make_service_project(
        tmp_path, patched_runtime.root, patched_runtime.python, demo_model, extra
    )
    result = proj.cli("config", "check")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "the installed server accepts every option" in result.stdout
    assert "--kv-bits 4" in result.stdout and "--prompt-cache-size 1" in result.stdout

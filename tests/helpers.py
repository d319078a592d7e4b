"""Test helpers: free ports, real servers that always stop, running the CLI for real."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from mlx_local.processes import free_port, terminate
from mlx_local.service.process import wait_healthy

REPO_ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


@contextmanager
def server_process(
    python: Path,
    args: Sequence[str],
    env: Mapping[str, str] | None = None,
    timeout: float = 180,
) -> Iterator[tuple[subprocess.Popen, str, Path]]:
    """Start `python -m mlx_lm.server --host 127.0.0.1 --port P args...` in its own session,
    wait for /health, yield (process, base URL, log path), and always stop the server
    (SIGTERM, then SIGKILL)."""
    port = free_port()
    log_path = Path(tempfile.mkstemp(prefix="mlx-server-", suffix=".log")[1])
    command = [str(python), "-m", "mlx_lm.server", "--host", "127.0.0.1", "--port", str(port)]
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [*command, *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
    try:
        if not wait_healthy("127.0.0.1", port, timeout, lambda: process.poll() is None, 0.3):
            raise RuntimeError(
                f"server did not answer /health (exit code {process.poll()}); "
                f"log:\n{log_path.read_text()[-3000:]}"
            )
        yield process, f"http://127.0.0.1:{port}", log_path
    finally:
        stop_process(process)


@contextmanager
def running_server(
    python: Path,
    args: Sequence[str],
    env: Mapping[str, str] | None = None,
    timeout: float = 180,
) -> Iterator[tuple[str, Path]]:
    """`server_process` for tests that need only (base URL, log path)."""
    with server_process(python, args, env, timeout) as (_, url, log_path):
        yield url, log_path


def stop_process(process: subprocess.Popen, grace: float = 15) -> None:
    """Stop a process started with start_new_session: SIGTERM, then SIGKILL; reap it."""
    if process.poll() is None:
        terminate(process.pid, grace)
        process.wait()


def run_cli(
    args: Sequence[str],
    home: Path,
    env: Mapping[str, str] | None = None,
    script: str = "mlx-local",
    timeout: float = 900,
    stdin: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run one of the project's console scripts for real, on the project at `home` (with
    `stdin` as its input, else none)."""
    full_env = {**os.environ, "MLX_LOCAL_HOME": str(home), **(env or {})}
    return subprocess.run(
        [str(VENV_BIN / script), *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        input=stdin,
        stdin=None if stdin is not None else subprocess.DEVNULL,
    )


@dataclass(frozen=True)
class ServiceProject:
    root: Path
    port: int
    env: dict[str, str]

    def cli(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return run_cli(list(args), self.root, env=self.env, timeout=300, stdin=stdin)

    def status(self) -> dict:
        result = self.cli("status", "--json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    @property
    def pid_file(self) -> Path:
        return self.root / ".mlx-local" / "server.pid"


def make_service_project(
    base: Path,
    runtime_root: Path,
    python: Path,
    demo_model: Path,
    extra: str = "",
    max_tokens: int = 8,
) -> ServiceProject:
    """A project that borrows a set-up checkout and serves the demo model on a free port, with
    no login service installed and the hub offline."""
    root = base / "service project"
    (root / "local-models").mkdir(parents=True)
    (root / "mlx-lm-repo").symlink_to(runtime_root / "mlx-lm-repo")
    (root / "local-models" / "demo").symlink_to(demo_model)
    port = free_port()
    (root / "config.toml").write_text(
        f'model = "demo"\nport = {port}\nmax_tokens = {max_tokens}\n{extra}\n'
        "[service]\nstart_timeout = 180\nstop_timeout = 10\n"
    )
    env = {
        "MLX_LOCAL_PYTHON": str(python),
        "MLX_LOCAL_SERVICE_DIR": str(base / "no-service-installed"),
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(base / "hf-home"),
    }
    return ServiceProject(root, port, env)

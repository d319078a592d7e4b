"""Test helpers: free ports, real servers that always stop, running the CLI for real."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

from mlx_local.processes import free_port, terminate
from mlx_local.service.process import wait_healthy

REPO_ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


@contextmanager
def running_server(
    python: Path,
    args: Sequence[str],
    env: Mapping[str, str] | None = None,
    timeout: float = 180,
) -> Iterator[tuple[str, Path]]:
    """Start `python -m mlx_lm.server --host 127.0.0.1 --port P args...`, wait for /health,
    yield (base URL, log path), and always stop the server (SIGTERM, then SIGKILL)."""
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
        yield f"http://127.0.0.1:{port}", log_path
    finally:
        stop_process(process)


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
) -> subprocess.CompletedProcess[str]:
    """Run one of the project's console scripts for real, on the project at `home`."""
    full_env = {**os.environ, "MLX_LOCAL_HOME": str(home), **(env or {})}
    return subprocess.run(
        [str(VENV_BIN / script), *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
    )

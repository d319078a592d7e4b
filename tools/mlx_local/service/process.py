"""Background server process: pid file, server check, health, port checks, detached spawn."""

from __future__ import annotations

import errno
import json
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from ..atomic import write_atomic
from ..processes import ProcInfo

SERVER_MARKERS = ("mlx_lm.server", "mlx_local.cli serve", "mlx_local serve")


@dataclass(frozen=True)
class Record:
    """What `start` knows about the background server it launched (kept next to the pid file)."""

    pid: int
    host: str
    port: int
    model: str
    served_model_name: str
    log_file: str
    started_at: float


class PidFile:
    """`server.pid` (the pid) and `server.json` (the Record) in the project's state folder."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "server.pid"
        self.record_path = state_dir / "server.json"

    def write(self, record: Record) -> None:
        write_atomic(self.record_path, json.dumps(asdict(record), indent=2) + "\n")
        write_atomic(self.path, f"{record.pid}\n")

    def read(self) -> Record | None:
        """The record, or None when there is no pid file (a broken one counts as none)."""
        try:
            pid = int(self.path.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        try:
            data = json.loads(self.record_path.read_text())
            return Record(**{**data, "pid": pid})
        except (FileNotFoundError, ValueError, TypeError):
            return Record(pid, "", 0, "", "", "", 0.0)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
        self.record_path.unlink(missing_ok=True)


def is_server(info: ProcInfo | None) -> bool:
    """Whether `info` is a server we started (guards against a reused pid)."""
    return info is not None and any(marker in info.command for marker in SERVER_MARKERS)


def client_host(host: str) -> str:
    """The address a local client uses to reach a server listening on `host`."""
    if host in ("0.0.0.0", "", "*"):
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


def base_url(host: str, port: int) -> str:
    """http://host:port of a server listening on `host`."""
    target = client_host(host)
    return f"http://[{target}]:{port}" if ":" in target else f"http://{target}:{port}"


def healthy(host: str, port: int, timeout: float = 2.0) -> bool:
    """Whether GET /health answers 200."""
    try:
        with urllib.request.urlopen(f"{base_url(host, port)}/health", timeout=timeout) as reply:
            return reply.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def wait_healthy(
    host: str, port: int, timeout: float, alive: Callable[[], bool], poll: float = 0.5
) -> bool:
    """Poll /health until it answers (True) or the process dies or `timeout` passes (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if healthy(host, port):
            return True
        if not alive():
            return False
        time.sleep(poll)
    return healthy(host, port)


def port_in_use(host: str, port: int) -> bool:
    """Whether binding `host:port` fails because something already listens there."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as error:
            return error.errno == errno.EADDRINUSE
    return False


def spawn(argv: list[str], env: dict[str, str], cwd: Path, output: Path) -> subprocess.Popen:
    """Start `argv` detached (own session, stdin closed, output appended to `output`)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    with open(output, "ab") as out:
        return subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
        )

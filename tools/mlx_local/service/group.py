"""`serve` for a [distributed] group: run `mlx.launch`, watch every rank, and stop them all.

The group lives or dies as one: when any rank (or mlx.launch) exits, every other rank is
stopped and `serve` exits 1, so the service manager starts the whole group again and a
half-alive group never keeps the port. SIGTERM, SIGINT or SIGHUP stop every rank on every host
(by their pid files) and then mlx.launch's process group, and `serve` exits 0.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable

from ..atomic import write_atomic
from ..config import API_KEY_ENV, Config
from ..processes import terminate
from ..project import Project
from . import cluster, logs, process
from .command import ServerCommand

POLL = 1.0


def _children(pid: int) -> int:
    """How many live (non-zombie) children `pid` has."""
    try:
        out = subprocess.run(
            ["ps", "-A", "-o", "ppid=,stat="], capture_output=True, text=True, timeout=10
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return -1
    rows = (line.split() for line in out.splitlines())
    return sum(1 for row in rows if len(row) == 2 and row[0] == str(pid) and row[1][0] != "Z")


def _copy(stream, write: Callable[[bytes], None]) -> None:
    for chunk in iter(lambda: stream.read1(65536), b""):
        write(chunk)


def _kill_group(launch: subprocess.Popen, timeout: float) -> None:
    """End mlx.launch and whatever is left in its process group (local ranks, ssh clients):
    SIGTERM, up to `timeout` seconds for mlx.launch, then SIGKILL to anything left."""
    terminate(launch.pid, timeout, group=True)
    launch.wait()


def run(
    project: Project,
    config: Config,
    command: ServerCommand,
    log: logs.RotatingLog | None,
    banner: list[str] | None,
) -> int:
    """Run the group until a signal (exit 0) or the loss of any rank (exit 1)."""
    group = config.distributed
    assert group is not None
    rank_list = cluster.ranks(project, group)
    cluster.stop_ranks(rank_list, config.service.stop_timeout)  # leftovers of a killed serve
    key = cluster.key_file(project)
    if API_KEY_ENV in command.env:
        write_atomic(key, command.env[API_KEY_ENV], new_mode=0o600)
    else:
        key.unlink(missing_ok=True)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, lambda *_: stop.set())
    env = {k: v for k, v in os.environ.items() if k != API_KEY_ENV}
    stdin_read, stdin_write = os.pipe()  # mlx.launch spins on a stdin at end of file
    lock = threading.Lock()

    def write(data: bytes) -> None:
        with lock:
            if log:
                log.write(data)
            else:
                sys.stdout.buffer.write(data)
                sys.stdout.flush()

    launch = subprocess.Popen(
        command.argv,
        stdin=stdin_read,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**env, "PYTHONUNBUFFERED": "1"},
        cwd=project.root,
        start_new_session=True,
    )
    os.close(stdin_read)
    copier = threading.Thread(target=_copy, args=(launch.stdout, write), daemon=True)
    copier.start()
    expected = 1 if group.backend == "mpi" else group.size
    seen_all, reason = False, ""
    while not stop.wait(POLL):
        if launch.poll() is not None:
            reason = f"mlx.launch exited (code {launch.returncode})"
            break
        count = _children(launch.pid)
        seen_all = seen_all or count >= expected
        if seen_all and 0 <= count < expected:
            reason = f"a rank exited ({count} of {group.size} left)"
            break
        if banner and process.healthy(config.host, config.port, timeout=1.0):
            write(("\n".join(banner) + "\n").encode())
            banner = None
    if reason:
        write(f"mlx-local: {reason}; stopping the whole group\n".encode())
    # within the service manager's stop timeout: half for the ranks, then mlx.launch's group
    cluster.stop_ranks(rank_list, config.service.stop_timeout / 2)
    _kill_group(launch, config.service.stop_timeout / 4)
    os.close(stdin_write)
    key.unlink(missing_ok=True)
    copier.join(5)
    if log:
        log.close()
    return 1 if reason else 0

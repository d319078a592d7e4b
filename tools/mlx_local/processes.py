"""Processes the tools start: free ports, what `ps` says, their memory, and the one way to
stop a process."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class ProcInfo:
    """What `ps` says about a live process."""

    pid: int
    rss_bytes: int
    uptime_seconds: int
    command: str


def _parse_etime(text: str) -> int:
    """Seconds of a `ps` etime value: [[dd-]hh:]mm:ss."""
    days, _, rest = text.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    while len(parts) < 3:
        parts.insert(0, 0)
    hours, minutes, seconds = parts
    return ((int(days or 0) * 24 + hours) * 60 + minutes) * 60 + seconds


def process_info(pid: int) -> ProcInfo | None:
    """RSS, uptime and command line of `pid`, or None if it is gone (zombies count as gone)."""
    try:
        out = subprocess.run(
            ["ps", "-ww", "-o", "stat=,rss=,etime=,command=", "-p", str(pid)],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
    fields = out.split(None, 3)
    if len(fields) < 4 or fields[0].startswith("Z"):
        return None
    return ProcInfo(pid, int(fields[1]) * 1024, _parse_etime(fields[2]), fields[3])


def rss_bytes(pid: int) -> int:
    """The RSS of `pid` (ProcessLookupError if it is gone)."""
    info = process_info(pid)
    if info is None or not info.rss_bytes:
        raise ProcessLookupError(f"process {pid} is gone")
    return info.rss_bytes


def settled_rss(pid: int) -> int:
    """The RSS of `pid` once it stops moving (a second without a change of more than 1%,
    at most 20 s)."""
    last = rss_bytes(pid)
    for _ in range(20):
        time.sleep(1)
        now = rss_bytes(pid)
        if abs(now - last) <= last // 100:
            return now
        last = now
    return last


def anon_rss(pid: int) -> int | None:
    """RssAnon: the process's own data (heap, anonymous mappings, stacks) without the
    file-backed pages of its libraries' code; None where /proc does not say (macOS)."""
    status = Path(f"/proc/{pid}/status")
    if not status.is_file():
        return None
    for line in status.read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return None


def _alive(pid: int) -> bool:
    return process_info(pid) is not None


def terminate(pid: int, timeout: float, poll: float = 0.1, group: bool = False) -> str:
    """Stop `pid` gracefully: SIGTERM, then SIGKILL (its whole group) after `timeout` seconds.
    With `group`, SIGTERM goes to its whole process group, and what is left of the group once
    `pid` has gone is killed too (children that outlive their launcher).

    Returns "terminated", "killed" or "gone" (it had already exited).
    """
    try:
        (os.killpg if group else os.kill)(pid, signal.SIGTERM)
    except ProcessLookupError:
        return "gone"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            if group:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)
            return "terminated"
        time.sleep(poll)
    for kill in (lambda: os.killpg(pid, signal.SIGKILL), lambda: os.kill(pid, signal.SIGKILL)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            kill()
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(poll)
    return "killed"

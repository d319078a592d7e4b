"""The server's log: a size-capped file with rotation, a pump that fills it, tail and follow."""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

CHUNK = 65536


class RotatingLog:
    """Append to `path`; past `max_bytes` it becomes path.1 (.1 -> .2 ...); `backups` are kept."""

    def __init__(self, path: Path, max_bytes: int, backups: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "ab")  # noqa: SIM115 - held open for the pump's lifetime
        self._size = self._file.tell()

    def write(self, data: bytes) -> None:
        """Write `data`, rotating first if it would push the file past the cap."""
        if self._size and self._size + len(data) > self.max_bytes:
            self.rotate()
        self._file.write(data)
        self._file.flush()
        self._size += len(data)

    def rotate(self) -> None:
        """Shift path.N-1 -> path.N ... path -> path.1 and start an empty path."""
        self._file.close()
        for index in range(self.backups, 0, -1):
            source = self.path if index == 1 else self._numbered(index - 1)
            if source.exists():
                os.replace(source, self._numbered(index))
        self._file = open(self.path, "ab")  # noqa: SIM115
        self._size = 0

    def _numbered(self, index: int) -> Path:
        return self.path.with_name(f"{self.path.name}.{index}")

    def close(self) -> None:
        self._file.close()


def pump(fd: int, log: RotatingLog) -> None:
    """Copy everything read from `fd` into `log` until end of file."""
    try:
        while data := os.read(fd, CHUNK):
            log.write(data)
    finally:
        log.close()
        os.close(fd)


def tail(path: Path, lines: int) -> list[str]:
    """The last `lines` lines of `path` (empty if it does not exist)."""
    if not path.exists():
        return []
    with path.open("r", encoding="utf-8", errors="replace") as handle:
        return [line.rstrip("\n") for line in deque(handle, maxlen=lines)]


def follow(path: Path, poll: float = 0.5) -> Iterator[str]:
    """Lines appended to `path` from this call on, forever, across rotations."""
    handle = None
    if path.exists():
        handle = path.open("r", encoding="utf-8", errors="replace")
        handle.seek(0, os.SEEK_END)
    return _follow(path, handle, poll)


def _follow(path: Path, handle: TextIO | None, poll: float) -> Iterator[str]:
    inode = os.fstat(handle.fileno()).st_ino if handle else None
    while True:
        if handle is None and path.exists():
            handle = path.open("r", encoding="utf-8", errors="replace")
            inode = os.fstat(handle.fileno()).st_ino
        if handle is not None:
            line = handle.readline()
            if line:
                yield line.rstrip("\n")
                continue
            try:
                stat = path.stat()
            except FileNotFoundError:
                stat = None
            if stat is None or stat.st_ino != inode or stat.st_size < handle.tell():
                handle.close()
                handle = None
                continue
        time.sleep(poll)

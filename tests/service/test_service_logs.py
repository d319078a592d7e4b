"""The server's log: size cap with rotation, the pump that fills it, tail and follow."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from mlx_local.service import logs


def test_rotation_caps_size_and_keeps_backups(tmp_path: Path) -> None:
    path = tmp_path / "server.log"
    log = logs.RotatingLog(path, max_bytes=100, backups=3)
    for index in range(12):
        log.write(f"line {index:02d} ".encode() + b"x" * 40 + b"\n")  # 49 bytes each
    log.close()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["server.log", "server.log.1", "server.log.2", "server.log.3"]
    for file in tmp_path.iterdir():
        assert file.stat().st_size <= 100
    assert path.read_text().startswith("line 10")
    assert (tmp_path / "server.log.1").read_text().startswith("line 08")
    assert (tmp_path / "server.log.3").read_text().startswith("line 04")  # older ones dropped


def test_reopening_appends(tmp_path: Path) -> None:
    path = tmp_path / "server.log"
    for word in (b"one\n", b"two\n"):
        log = logs.RotatingLog(path, max_bytes=1000, backups=1)
        log.write(word)
        log.close()
    assert path.read_bytes() == b"one\ntwo\n"


def test_pump_copies_until_end_of_file(tmp_path: Path) -> None:
    path = tmp_path / "server.log"
    read_end, write_end = os.pipe()
    pumping = threading.Thread(target=logs.pump, args=(read_end, logs.RotatingLog(path, 10**6, 2)))
    pumping.start()
    os.write(write_end, b"INFO starting\n")
    os.write(write_end, b"INFO ready\n")
    os.close(write_end)
    pumping.join(timeout=10)
    assert not pumping.is_alive()
    assert logs.tail(path, 1) == ["INFO ready"]
    assert logs.tail(path, 10) == ["INFO starting", "INFO ready"]
    assert logs.tail(tmp_path / "missing.log", 5) == []


def test_follow_sees_new_lines_across_a_rotation(tmp_path: Path) -> None:
    path = tmp_path / "server.log"
    path.write_text("old line\n")
    log = logs.RotatingLog(path, max_bytes=30, backups=2)
    lines = logs.follow(path, poll=0.01)
    seen: list[str] = []

    def reader() -> None:
        for line in lines:
            seen.append(line)
            if len(seen) == 3:
                return

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    for text in (b"first new line\n", b"second, after rotating\n", b"third\n"):
        log.write(text)
        threading.Event().wait(0.2)
    thread.join(timeout=10)
    log.close()
    assert seen == ["first new line", "second, after rotating", "third"]

"""`mlx-local bench --quick` end to end: real servers (patched and upstream), real files.

Checks the structure of bench.json and that bench.png is a PNG; never speed."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from mlx_local.repo import patchqueue
from tests.conftest import PIN
from tests.helpers import run_cli

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk (fails on anything that is not a PNG)."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    return struct.unpack(">II", data[16:24])


def is_seconds(value: object) -> bool:
    return isinstance(value, float) and 0 < value < 600


@pytest.mark.slow
def test_bench_quick_writes_json_and_png(patched_runtime, demo_model, tmp_path):
    out = tmp_path / "out"
    result = run_cli(
        ["bench", "--quick", "--model", str(demo_model), "--out", str(out)],
        patched_runtime.root,
        env=patched_runtime.env,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Time to first token" in result.stdout

    data = json.loads((out / "bench.json").read_text())
    assert data["meta"]["quick"] is True and data["meta"]["base"] == PIN
    assert set(data["ttft"]) == {"upstream", "patched"}
    for rows in data["ttft"].values():
        assert set(rows) == {"64", "128"}
        for entry in rows.values():
            assert is_seconds(entry["cold_s"]) and is_seconds(entry["warm_s"])
            assert entry["warm_over_cold"] == pytest.approx(entry["warm_s"] / entry["cold_s"])
            assert entry["prompt_tokens"] >= 64
    for entry in data["decode"].values():
        assert entry["short_tps"] > 0 and entry["long_tps"] > 0

    kv = data["kv_cache"]
    assert set(kv["configs"]) == {"fp16", "8bit", "4bit"}
    full, four = kv["configs"]["fp16"]["bytes"], kv["configs"]["4bit"]["bytes"]
    assert set(full) == {"64", "256", "512"}
    # mlx-lm's KV caches grow in steps of 256 tokens: twice the steps, twice the bytes
    assert full["512"] == 2 * full["256"] and four["512"] < full["512"]
    assert set(kv["server"]) == {
        "patched fp16 KV",
        "patched --kv-bits 8",
        "patched --kv-bits 4",
    }

    assert set(data["interleaved"]) == {
        "upstream (default)",
        "patched (default)",
        "patched --prompt-cache-size 1",
        "patched --prompt-cache-size 3",
    }
    for entry in data["interleaved"].values():
        assert is_seconds(entry["return_to_a_s"])

    series = patchqueue.Series.load(patched_runtime.root / "patches" / "series")
    has_disk_cache = any("prompt-cache-dir" in e.name for e in series.entries)
    assert data["restart"]["available"] is has_disk_cache
    if has_disk_cache:
        for label in ("with disk cache", "without disk cache"):
            assert is_seconds(data["restart"][label]["after_restart_s"])

    assert data["peak_rss_bytes"]["upstream"] > 10 * 2**20
    assert all(v and v > 0 for v in data["peak_rss_bytes"].values())

    width, height = png_size(out / "bench.png")
    assert width > 400 and height > 200

    # The upstream server really ran upstream's files, the patched one the checkout's.
    upstream_tree = data["meta"]["upstream_tree"]
    assert f"{upstream_tree}/mlx_lm/server.py" in (out / "logs" / "upstream.log").read_text()
    assert upstream_tree not in (out / "logs" / "patched.log").read_text()


def test_bench_refuses_a_folder_that_is_not_a_model(project_copy, tmp_path):
    result = run_cli(["bench", "--quick", "--model", str(tmp_path)], project_copy)
    assert result.returncode == 1
    assert "is not a model folder" in result.stderr

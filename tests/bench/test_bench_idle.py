"""The idle benchmark end to end: memory given back, reloads, the next turn after a wake-up.

Checks the report's shape and what the server's own counts say (the tokens each turn
processed, the same process throughout); never speed."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_bench_idle_reports_memory_and_the_next_turn(patched_runtime, tmp_path):
    out = tmp_path / "idle.json"
    result = subprocess.run(
        [sys.executable, "-m", "mlx_local.bench.idle", "--prefix", "400", "--rounds", "1"]
        + ["--python", str(patched_runtime.python), "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    figures = json.loads(out.read_text())
    memory, turn = figures["memory"], figures["next_turn"]
    assert memory["same_process"] is True
    assert memory["mlx_active_idle"] <= 16 and memory["mlx_cache_idle"] == 0
    assert memory["rss_idle"] < memory["rss_loaded"]
    # After the wake-up only the new tokens are processed; cold, the whole prompt.
    assert 0 < turn["wake_processed"] < 40
    assert turn["cold_processed"] >= turn["prompt_tokens"] - 40
    assert turn["reloads"] == 2
    assert re.search(r"idle / loaded RSS: \d\.\d{3}", result.stdout)
    assert re.search(r"wake-up / warm: \d+\.\d\d; wake-up / cold: \d\.\d{3}", result.stdout)
    assert "estimate for a 60 GB model (an estimate, not a measurement)" in result.stdout
    cost = figures["loaded_cost"]
    assert cost["rounds"] == 1
    assert all(cost[side]["prefill"] > 0 and cost[side]["decode"] > 0 for side in ("off", "on"))
    assert re.search(r"a new prompt's TTFT: .* with it \(\d\.\d{3}\)", result.stdout)

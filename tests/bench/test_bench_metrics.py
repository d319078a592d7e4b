"""The /metrics A/B/A benchmark end to end on the demo model: A is the patched server, B the
same checkout without the metrics patch (the benchmark checks that B has no /metrics).

Checks the report's shape; never speed."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_bench_metrics_reports_ratios(patched_runtime, demo_model):
    result = subprocess.run(
        [sys.executable, "-m", "mlx_local.bench.metrics_cost", "--rounds", "2", "--tokens", "8"]
        + ["--model", str(demo_model)],
        capture_output=True,
        text=True,
        env={**os.environ, **patched_runtime.env},
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = result.stdout
    assert len(re.findall(r"^\s+[12]\s+\d", report, re.MULTILINE)) == 2
    assert re.search(r"decode tok/s A/B: median \d+\.\d{3}, 95% interval", report)
    assert re.search(r"A1/A2 \(noise between the two A runs\): median \d", report)
    assert re.search(r"scrapes of A: \d+", report)

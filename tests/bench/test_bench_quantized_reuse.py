"""The quantized-reuse benchmark end to end on the demo model: A is the patched server, B the
same checkout without patch 0016. The server's own count of reused tokens says which one
prefilled a new conversation on another one's quantized cache.

Checks the report's shape and what each server reused; never speed."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_bench_quantized_reuse_reports_both_servers(patched_runtime, demo_model):
    result = subprocess.run(
        [sys.executable, "-m", "mlx_local.bench.quantized_reuse", "--conversations", "2"]
        + ["--tokens", "300", "--model", str(demo_model)],
        capture_output=True,
        text=True,
        env={**os.environ, **patched_runtime.env},
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    rows = re.findall(
        r"^(1 \(first\)|2)\s+\d+\.\d+s\s+(\d+)\s+\d+\.\d+s\s+(\d+)$", result.stdout, re.MULTILINE
    )
    # The first conversation finds nothing; the second reuses a few template tokens of the
    # first one's quantized cache on B only.
    assert rows[0] == ("1 (first)", "0", "0")
    assert rows[1][0] == "2" and rows[1][1] == "0" and 0 < int(rows[1][2]) < 256
    assert re.search(r"next/first TTFT: A \d+\.\d+x, B \d+\.\d+x", result.stdout)
    assert re.search(r"later conversations, B/A TTFT \(medians\): \d+\.\d+x", result.stdout)

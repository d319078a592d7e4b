"""The shipped demo model says its script: loaded by the real mlx-lm at the pin, every checked
exchange's answer is the top-1 token with probability >= 0.9 at every step, and real greedy
generation reproduces each scripted answer (demo_check.py, in the runtime python)."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from mlx_local.models import demo_model
from tests.helpers import REPO_ROOT

pytestmark = pytest.mark.slow


def test_greedy_decoding_of_every_exchange_is_the_script(patched_runtime) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "tools")}
    done = subprocess.run(
        [str(patched_runtime.python), "-m", "mlx_local.models.demo_check"],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    print(f"\ndemo model check: {result}")
    assert result["greedy_wrong"] == []
    assert result["below_margin"] == 0 and result["min_margin"] >= 0.9
    held, total = map(int, result["held-out"].split("/"))
    assert held >= 0.8 * total, "fallback for short prompts outside the script"
    record = json.loads((demo_model.shipped_dir() / demo_model.RECORD_FILE).read_text())
    assert result["min_margin"] == pytest.approx(record["min_margin"], abs=0.02)

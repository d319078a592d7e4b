"""`mlx-local plan` says what idle_unload gives back and what stays in memory when idle."""

from __future__ import annotations

import json
import os
from pathlib import Path

from mlx_local.plan import machine
from mlx_local.plan.machine import MiB
from tests.conftest import make_project
from tests.helpers import free_port, run_cli


def _project(tmp_path: Path, demo_model: Path, extra: str = "") -> Path:
    root = make_project(tmp_path / "project")
    os.symlink(demo_model, root / "local-models" / "demo")
    (root / "config.toml").write_text(
        f'model = "demo"\nport = {free_port()}\nprompt_cache_dir = false\n{extra}'
    )
    return root


def test_plan_says_what_stays_in_memory_when_idle(tmp_path: Path, demo_model: Path) -> None:
    env = {machine.MEMORY_ENV: str(64 * MiB)}
    root = _project(tmp_path / "on", demo_model, 'idle_unload = "30m"\n')
    plan = json.loads(run_cli(["plan", "--json"], root, env=env).stdout)
    worst = max(row["total_bytes"] for row in plan["contexts"])
    assert plan["idle"]["idle_unload_seconds"] == 1800
    assert plan["idle"]["given_back_bytes"] == worst
    assert "the server process itself" in plan["idle"]["stays"]
    table = run_cli(["plan"], root, env=env).stdout
    assert "idle: after 1800 s without a request (idle_unload) the weights" in table
    assert "what stays: the server process itself" in table

    off = run_cli(["plan"], _project(tmp_path / "off", demo_model), env=env).stdout
    assert "idle: idle_unload is off, so the model keeps up to" in off

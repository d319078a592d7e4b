"""KV quantization settings that cannot work are refused at start, never per request.

The demo model's head size is 32: with kv_bits and the server's default group size 64 every
request would fail inside the server. `config check`, `start` and `serve` read the model's
config.json and refuse; a working group size passes, with the CPU backend's warning. The
backend probe runs one real quantized attention step with the runtime's mlx.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from mlx_local.service import kv_check
from tests.helpers import make_service_project

pytestmark = pytest.mark.slow


def one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


def test_a_group_that_does_not_divide_the_head_size_is_refused_everywhere(
    tmp_path: Path, patched_runtime, demo_model: Path
) -> None:
    proj = make_service_project(
        tmp_path, patched_runtime.root, patched_runtime.python, demo_model, "kv_bits = 4"
    )
    for command in (["config", "check"], ["start"], ["serve"]):
        result = proj.cli(*command)
        assert result.returncode == 1, (command, result.stdout, result.stderr)
        line = one_error_line(result.stderr)
        assert "kv_group_size 64 does not divide the head size 32" in line, line
        assert "e.g. 32" in line and "config.toml" in line
    assert not proj.pid_file.exists()
    with socket.socket() as sock:  # nothing was left listening
        assert sock.connect_ex(("127.0.0.1", proj.port)) != 0


def test_a_working_group_passes_with_the_cpu_warning(
    tmp_path: Path, patched_runtime, demo_model: Path
) -> None:
    extra = "kv_bits = 4\nkv_group_size = 32"
    proj = make_service_project(
        tmp_path, patched_runtime.root, patched_runtime.python, demo_model, extra
    )
    result = proj.cli("config", "check")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "10 times slower" in result.stdout and "quantized_kv_start" in result.stdout

    started = proj.cli("start")
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        assert "10 times slower" in started.stdout + started.stderr
    finally:
        proj.cli("stop")


def test_the_probe_runs_real_quantized_attention(patched_runtime) -> None:
    works = kv_check.probe(patched_runtime.python, head=32, group=32, bits=4)
    assert works == kv_check.ProbeResult("cpu", None)
    # A shape the kernels cannot take is reported, not raised: the probe's error path.
    broken = kv_check.probe(patched_runtime.python, head=48, group=32, bits=4)
    assert broken.backend == "cpu" and broken.error

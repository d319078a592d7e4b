"""convert-model failures: damaged weights, unknown architecture, no disk space, interruption.
Each leaves nothing in local-models/ and says what happened in one line."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import time
from pathlib import Path

import pytest

from mlx_local.models import planning
from tests.conftest import PatchedRuntime, make_project
from tests.helpers import VENV_BIN, run_cli

SMALL_FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"]


def convert(runtime: PatchedRuntime, home: Path, *args: str) -> subprocess.CompletedProcess:
    env = {"MLX_LOCAL_PYTHON": str(runtime.python)}
    return run_cli(list(args), home, env=env, script="convert-model")


def local_models(home: Path) -> list[str]:
    return sorted(p.name for p in (home / "local-models").iterdir())


def copy_demo(demo_model: Path, dest: Path, weights: bool = True) -> Path:
    dest.mkdir(parents=True)
    for name in SMALL_FILES + (["model.safetensors"] if weights else []):
        shutil.copy(demo_model / name, dest / name)
    return dest


def one_line_error(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 1, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    return lines[0]


@pytest.mark.slow
def test_truncated_safetensors_leaves_nothing_and_says_why(
    tmp_path: Path, demo_model: Path, patched_runtime: PatchedRuntime
) -> None:
    home = make_project(tmp_path / "project")
    source = copy_demo(demo_model, tmp_path / "broken", weights=False)
    data = (demo_model / "model.safetensors").read_bytes()
    (source / "model.safetensors").write_bytes(data[: len(data) // 3])

    error = one_line_error(convert(patched_runtime, home, str(source)))
    assert f"model.safetensors is truncated: {len(data) // 3} bytes" in error
    assert "nothing was written" in error
    assert local_models(home) == []


@pytest.mark.slow
def test_unsupported_architecture_is_refused_before_any_work(
    tmp_path: Path, demo_model: Path, patched_runtime: PatchedRuntime
) -> None:
    home = make_project(tmp_path / "project")
    source = copy_demo(demo_model, tmp_path / "odd")
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps(config | {"model_type": "no_such_arch"}))

    error = one_line_error(convert(patched_runtime, home, str(source)))
    assert "unsupported architecture 'no_such_arch'" in error
    assert local_models(home) == []


@pytest.mark.slow
def test_not_enough_disk_is_refused_with_the_numbers(
    tmp_path: Path, demo_model: Path, patched_runtime: PatchedRuntime
) -> None:
    """A real source whose weights are bigger than the free disk: a sparse safetensors file
    with a valid header for one huge float16 tensor (it occupies almost nothing)."""
    home = make_project(tmp_path / "project")
    free = shutil.disk_usage(home / "local-models").free
    rows = (free * 2) // 1024 + 1  # 2x free parameters: the 4-bit output alone is ~1.1x free
    size = rows * 1024 * 2
    if size > 15 * 2**40:
        pytest.skip("too much free disk to fake a model that does not fit")
    source = copy_demo(demo_model, tmp_path / "huge", weights=False)
    header = json.dumps(
        {"w": {"dtype": "F16", "shape": [rows, 1024], "data_offsets": [0, size]}}
    ).encode()
    with open(source / "model.safetensors", "wb") as handle:
        handle.write(struct.pack("<Q", len(header)) + header)
        handle.truncate(8 + len(header) + size)

    started = time.monotonic()
    error = one_line_error(convert(patched_runtime, home, str(source)))
    assert "not enough disk space" in error
    assert planning.gb(free)[:-3] in error or "free" in error
    needed = rows * 1024 * 4.5 / 8
    assert planning.gb(int(needed * planning.DISK_MARGIN))[:3] in error, error
    assert local_models(home) == []
    assert time.monotonic() - started < 60, "the refusal must come before reading the weights"


def _runner_processes(home: Path) -> list[int]:
    """Runner processes started for the project at `home` (found by their environment)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
                environ = (entry / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"convert_runner" in cmdline and f"MLX_LOCAL_HOME={home}".encode() in environ:
                found.append(int(entry.name))
    return found


def _start(runtime: PatchedRuntime, home: Path, source: Path, name: str) -> subprocess.Popen:
    env = os.environ | {"MLX_LOCAL_HOME": str(home), "MLX_LOCAL_PYTHON": str(runtime.python)}
    return subprocess.Popen(
        [str(VENV_BIN / "convert-model"), str(source), "--name", name],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _wait_for_build_folder(process: subprocess.Popen, home: Path, name: str) -> Path:
    """The moment the converted files are being written and verified."""
    folder = home / "local-models" / f".tmp-{name}-{process.pid}"
    deadline = time.monotonic() + 120
    while not folder.is_dir():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the conversion never started writing"
        time.sleep(0.005)
    return folder


@pytest.mark.slow
def test_sigterm_during_the_write_leaves_nothing(
    tmp_path: Path, demo_model: Path, patched_runtime: PatchedRuntime
) -> None:
    home = make_project(tmp_path / "project")
    process = _start(patched_runtime, home, demo_model, "interrupted")
    _wait_for_build_folder(process, home, "interrupted")
    assert _runner_processes(home), "the runner should be at work now"
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert local_models(home) == []
    assert _runner_processes(home) == []


@pytest.mark.slow
def test_killed_conversion_is_swept_by_the_next_one(
    tmp_path: Path, demo_model: Path, patched_runtime: PatchedRuntime
) -> None:
    home = make_project(tmp_path / "project")
    process = _start(patched_runtime, home, demo_model, "killed")
    _wait_for_build_folder(process, home, "killed")
    os.killpg(process.pid, signal.SIGKILL)  # like a power cut: no cleanup at all
    process.communicate(timeout=60)
    assert all(name.startswith(".tmp-killed-") for name in local_models(home))

    listed = run_cli(["models", "--json"], home)
    assert json.loads(listed.stdout) == [], "a half-written model must never be listed"

    done = convert(patched_runtime, home, str(demo_model), "--name", "next")
    assert done.returncode == 0, done.stderr
    assert local_models(home) == ["next"]

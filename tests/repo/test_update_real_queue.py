"""The real patch queue moved across real mlx-lm releases: the oldest supported, the release
where each guard changes, and the pin; at each one the patched server serves a request."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from mlx_local.models import demo_script as script
from mlx_local.repo import patchqueue
from tests.conftest import PIN, make_project
from tests.helpers import run_cli, running_server


def outcome(report: str, patch_prefix: str) -> str:
    match = re.search(rf"{patch_prefix}[^│]*│\s*(\S+)", report)
    assert match, report
    return match.group(1)


def serve_one_request(python: Path, model: Path) -> None:
    """Start the installed patched server with every queue option and serve one chat turn."""
    args = [
        "--model",
        str(model),
        "--served-model-name",
        "mlx-local",
        "--kv-bits",
        "4",
        "--kv-group-size",
        "32",
        "--prompt-cache-size",
        "1",
    ]
    with running_server(python, args) as (url, _):
        with urllib.request.urlopen(f"{url}/v1/models") as response:
            ids = [m["id"] for m in json.load(response)["data"]]
        assert ids == ["mlx-local"]
        request = urllib.request.Request(
            f"{url}/v1/chat/completions",
            data=json.dumps(
                {
                    "model": "mlx-local",
                    "max_tokens": 64,
                    "messages": [{"role": "user", "content": "hi"}],
                }
            ).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            body = json.load(response)
        # the scripted demo model thinks, then greets (a base without the reasoning
        # split keeps the thought in the content)
        assert body["model"] == "mlx-local"
        assert script.GREETING in body["choices"][0]["message"]["content"]


@pytest.mark.slow
def test_queue_moves_to_newer_releases_and_keeps_every_option(
    tmp_path: Path, stand_in_upstream: Path, demo_model: Path
) -> None:
    home = make_project(tmp_path / "project")
    # the queue as it was before any update: no patch guarded for being absorbed yet
    series = patchqueue.Series.load(home / "patches" / "series")
    for entry in series.entries:
        if entry.guard is not None and "<" in str(entry.guard):
            entry.guard = None
    series.save(home / "patches" / "series")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = {"MLX_LOCAL_PYTHON": str(venv / "bin" / "python"), "COLUMNS": "200"}
    source = ["--upstream", str(stand_in_upstream), "--source", "git"]
    setup = run_cli([*source, "--ref", "v0.30.7"], home, env, script="setup-repo")
    assert setup.returncode == 0, setup.stdout + setup.stderr
    all_options = setup.stdout.split("server provides:")[1].split()
    serve_one_request(Path(env["MLX_LOCAL_PYTHON"]), demo_model)

    to_031 = run_cli([*source, "--to", "v0.31.3"], home, env, script="update-upstream")
    assert to_031.returncode == 0, to_031.stdout + to_031.stderr
    assert outcome(to_031.stdout, "0001-server-prompt-cache-size") == "absorbed"
    for other in ("0002", "0003", "0004"):
        assert outcome(to_031.stdout, other) in ("clean", "three-way")
    series = patchqueue.Series.load(home / "patches" / "series")
    assert str(series.find("0001-server-prompt-cache-size.patch").guard) == "<0.31.0"
    serve_one_request(Path(env["MLX_LOCAL_PYTHON"]), demo_model)

    to_newest = run_cli(source, home, env, script="update-upstream")
    assert to_newest.returncode == 0, to_newest.stdout + to_newest.stderr
    assert f"v0.31.3 → {PIN}" in to_newest.stdout
    assert outcome(to_newest.stdout, "0002-server-kv-cache-quantization") == "absorbed"
    assert f'pin = "{PIN}"' in (home / "patches" / "upstream.toml").read_text()

    help_text = subprocess.run(
        [env["MLX_LOCAL_PYTHON"], "-m", "mlx_lm.server", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for option in all_options:
        assert option in help_text, option
    serve_one_request(Path(env["MLX_LOCAL_PYTHON"]), demo_model)

    # the absorbed patches stay in the series: the old base still gets every option
    back = run_cli([*source, "--ref", "v0.30.7", "--no-install"], home, env, script="setup-repo")
    assert back.returncode == 0, back.stdout + back.stderr
    assert back.stdout.split("server provides:")[1].split() == all_options

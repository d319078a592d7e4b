"""A [distributed] group for real: mlx.launch (ring backend) with the patched server.

Ranks run on 127.0.0.1 (mlx.launch starts those without ssh) and on 127.0.0.2, reached over
ssh through a real sshd the tests start (see tests/distributed_helpers.py). Tensor parallel
uses the demo model; pipeline uses its Qwen2-layout variant with 4 layers (mlx-lm 0.32.2
pipelines Qwen2 but not Qwen3, and every rank needs a layer).
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from mlx_local import processes
from mlx_local.models.demo_variant import build_variant
from mlx_local.project import Project
from mlx_local.service import group_disk, process
from tests.helpers import VENV_BIN
from tests.service.distributed_helpers import (
    DEAD,
    LOADED,
    REMOTE,
    SAVED,
    GroupProject,
    Sshd,
    disk_log,
    kill,
    make_group_project,
    processes_with,
    running_sshd,
    sshd_missing,
    upstream_checkout,
    wait_for,
)

KEY = "group-key-1"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    reason = sshd_missing()
    if reason:
        pytest.skip(reason)
    with running_sshd(tmp_path_factory.mktemp("sshd")) as daemon:
        yield daemon


@pytest.fixture(scope="module")
def pipeline_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_variant(tmp_path_factory.mktemp("models") / "demo-qwen2-4l", num_hidden_layers=4)


@pytest.fixture
def group(tmp_path: Path, patched_runtime, sshd: Sshd) -> Iterator[GroupProject]:
    proj = make_group_project(tmp_path, patched_runtime.root, patched_runtime.python, sshd.bin_dir)
    yield proj
    proj.cli("stop")  # never leave a rank behind
    assert processes_with(f"--port {proj.port} ") == []


def client(proj: GroupProject, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"http://127.0.0.1:{proj.port}/v1", api_key=key, max_retries=0, timeout=120
    )


def chat(proj: GroupProject, text: str, model: str = "mlx-local"):
    return client(proj).chat.completions.create(
        model=model, messages=[{"role": "user", "content": text}], max_tokens=4
    )


def status(proj: GroupProject) -> dict:
    result = proj.cli("status", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def assert_stops_cleanly(proj: GroupProject) -> None:
    pids = [rank["pid"] for rank in status(proj)["ranks"]]
    result = proj.cli("stop")
    assert result.returncode == 0, result.stderr
    assert "stopped" in result.stdout
    assert processes_with(f"--port {proj.port} ") == [], "a rank or mlx.launch survived stop"
    assert all(processes.process_info(pid) is None for pid in pids)
    assert not list((proj.root / ".mlx-local" / "cluster").glob("rank-*.pid"))
    assert not (proj.root / ".mlx-local" / "cluster" / "api-key").exists()


def test_tensor_two_ranks_serve_the_id_with_the_key(group: GroupProject, demo_model: Path) -> None:
    options = f'api_key = "{KEY}"\nprompt_cache_size = 2'
    group.write_config(demo_model, 'hosts = ["127.0.0.1", "127.0.0.1"]', options)
    started = group.cli("start")
    assert started.returncode == 0, started.stdout + started.stderr
    reply = chat(group, "Hello there")
    assert reply.model == "mlx-local" and reply.usage.completion_tokens > 0
    with pytest.raises(openai.NotFoundError):
        chat(group, "Hello", model="some-other-model")
    with pytest.raises(openai.AuthenticationError):
        client(group, key="wrong").models.list()
    state = status(group)
    assert state["state"] == "running" and state["health"] == "ok"
    assert [(r["rank"], r["host"], r["alive"]) for r in state["ranks"]] == [
        (0, "127.0.0.1", True),
        (1, "127.0.0.1", True),
    ]
    assert all(r["rss_bytes"] > 10 * 2**20 for r in state["ranks"])
    # every rank got the same server options; the key reached rank 0 only, not a command line
    lines = [line for line in processes_with(f"--port {group.port} ") if "-m mlx_lm.server" in line]
    assert all("--prompt-cache-size 2" in line for line in lines)
    assert not any(KEY in line for line in lines)
    assert_stops_cleanly(group)


def test_pipeline_two_ranks_one_over_ssh(group: GroupProject, pipeline_model: Path) -> None:
    group.write_config(pipeline_model, f'hosts = ["127.0.0.1", "{REMOTE}"]\nmode = "pipeline"')
    started = group.cli("start")
    assert started.returncode == 0, started.stdout + started.stderr
    assert chat(group, "Split over two").usage.completion_tokens > 0
    ranks = status(group)["ranks"]
    assert [(r["host"], r["alive"]) for r in ranks] == [("127.0.0.1", True), (REMOTE, True)], ranks
    assert "sshd" in parent_command(ranks[1]["pid"])  # rank 1 really came in over ssh
    assert "sshd" not in parent_command(ranks[0]["pid"])
    assert_stops_cleanly(group)


def test_three_ranks_pipeline_a_dead_rank_stops_the_group(
    group: GroupProject, pipeline_model: Path
) -> None:
    group.write_config(
        pipeline_model,
        f'hosts = ["127.0.0.1", "{REMOTE}", "127.0.0.1"]\nmode = "pipeline"',
        f'api_key = "{KEY}"',
    )
    per_rank_disk = group_disk.server_keeps_ranks(Project(group.root))
    # `serve --log` is what systemd and launchd run; they restart it when it exits non-zero
    serve = subprocess.Popen(
        [str(VENV_BIN / "mlx-local"), "serve", "--log"],
        env={**_env(group), "MLX_LOCAL_HOME": str(group.root)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert process.wait_healthy("127.0.0.1", group.port, 240, lambda: serve.poll() is None), (
            group.root / "logs" / "server.log"
        ).read_text()[-3000:]
        first = chat(group, "one two three four five six seven")
        assert first.usage.completion_tokens > 0
        assert [r["alive"] for r in status(group)["ranks"]] == [True, True, True]
        if per_rank_disk:  # every rank has written its shard of the first turn
            assert wait_for(lambda: len(disk_log(group.root, SAVED)) == 3)
        kill(group.pid_of_rank(1))  # the rank on the ssh host
        assert serve.wait(60) == 1
    finally:
        if serve.poll() is None:
            serve.terminate()
            serve.wait(60)
    assert processes_with(f"--port {group.port} ") == [], "half a group survived"
    assert not process.port_in_use("127.0.0.1", group.port)
    # the service manager's restart brings the whole group back
    restarted = group.cli("start")
    assert restarted.returncode == 0, restarted.stdout + restarted.stderr
    again = chat(group, "one two three four five six seven")
    assert again.usage.completion_tokens > 0
    assert again.choices[0].message.content == first.choices[0].message.content
    if per_rank_disk:  # the crashed group's disk tier serves the first turn on every rank
        assert again.usage.prompt_tokens_details.cached_tokens > 0
        assert sorted(rank for _, rank, _ in disk_log(group.root, LOADED)) == [0, 1, 2]
    else:  # no disk prompt cache: the first turn after the restart is cold
        assert again.usage.prompt_tokens_details.cached_tokens == 0
    # the in-memory cache of every rank serves the next turn
    warm = chat(group, "one two three four five six seven")
    assert warm.usage.prompt_tokens_details.cached_tokens > 0
    assert_stops_cleanly(group)


def _env(proj: GroupProject) -> dict[str, str]:
    return {**os.environ, **proj.env}


def parent_command(pid: int) -> str:
    ppid = subprocess.run(["ps", "-o", "ppid=", "-p", str(pid)], capture_output=True, text=True)
    parent = subprocess.run(
        ["ps", "-ww", "-o", "command=", "-p", ppid.stdout.strip()], capture_output=True, text=True
    )
    return parent.stdout


def test_an_older_server_keeps_the_default_off_and_refuses_a_folder(
    tmp_path: Path, patched_runtime, stand_in_upstream: Path, demo_model: Path
) -> None:
    """A checkout whose server does not keep the disk prompt cache per rank (the pinned
    upstream's server.py): the default tier is off in a group, an explicit folder one line."""
    proj = make_group_project(tmp_path, patched_runtime.root, patched_runtime.python, None)
    upstream_checkout(proj.root, stand_in_upstream)
    proj.write_config(demo_model, 'hosts = ["127.0.0.1", "127.0.0.1"]')
    checked = proj.cli("config", "check", "--no-probe")
    assert checked.returncode == 0, checked.stderr
    assert "--prompt-cache-dir" not in checked.stdout
    assert "note: the disk prompt cache is off" in checked.stdout
    proj.write_config(
        demo_model, 'hosts = ["127.0.0.1", "127.0.0.1"]', 'prompt_cache_dir = ".cache/pc"'
    )
    refused = proj.cli("start")
    assert refused.returncode != 0
    assert refused.stderr.startswith("error: prompt_cache_dir is set but [distributed] is on")
    assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert processes_with(f"--port {proj.port} ") == []


def test_cluster_check_names_a_dead_host_and_another_mlx(
    tmp_path: Path, patched_runtime, sshd: Sshd, demo_model: Path
) -> None:
    other = tmp_path / "other-venv"
    subprocess.run([str(VENV_BIN / "python"), "-m", "venv", str(other)], check=True)
    pip = [str(other / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps"]
    subprocess.run([*pip, "mlx==0.31.1"], check=True, capture_output=True)
    proj = make_group_project(tmp_path, patched_runtime.root, patched_runtime.python, sshd.bin_dir)
    hosts = f'hosts = ["127.0.0.1", "{REMOTE}", "{DEAD}"]'
    proj.write_config(demo_model, f'{hosts}\nremote_python = "{other / "bin" / "python"}"')
    result = proj.cli("cluster", "check", timeout=120)
    assert result.returncode != 0
    problems = [line for line in result.stdout.splitlines() if line.startswith("problem:")]
    assert all("; fix: " in line for line in problems), result.stdout
    mlx = [line for line in problems if line.startswith(f"problem: {REMOTE}: mlx ")]
    assert mlx and "mlx 0.31.1, rank 0 has mlx 0." in mlx[0]
    assert f"ssh {REMOTE} '{other}/bin/python -m pip install mlx==" in mlx[0]
    # that venv has no mlx-lm either: the same line names it
    assert any(f"{REMOTE}: patch queue" in line and "(not installed)" in line for line in problems)
    dead = [line for line in problems if line.startswith(f"problem: {DEAD}: ")]
    assert len(dead) == 1 and "not reachable over ssh" in dead[0]
    assert f"ssh-copy-id {DEAD}" in dead[0]
    assert len(problems) == 3, result.stdout
    assert "launch command:" in result.stdout and "mlx.launch --backend ring" in result.stdout
    assert "3 problem(s)" in result.stderr
    # the same group without the odd hosts is ready
    proj.write_config(demo_model, f'hosts = ["127.0.0.1", "{REMOTE}"]')
    ready = proj.cli("cluster", "check", timeout=120)
    assert ready.returncode == 0, ready.stdout + ready.stderr
    assert "2 ranks are ready" in ready.stdout

"""The manual's group steps, verbatim, from a fresh `mlx-local config init` (issue 21).

`config init`, the user's own model and port, the [distributed] table of docs/distributed.md
appended as it is (docs drift fails here) with this box's hosts: rank 0 on 127.0.0.1,
rank 1 on 127.0.0.2 over ssh through the real sshd of the distributed tests. Then
`cluster check`, `start`, a turn with the `openai` client, `status`, `stop`; and, when the
server keeps the disk prompt cache per rank, a restart that is warm on every rank.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from mlx_local.project import Project
from mlx_local.service import group_disk
from tests.service.distributed_helpers import (
    LOADED,
    REMOTE,
    GroupProject,
    Sshd,
    disk_log,
    make_group_project,
    processes_with,
    readme_group_config,
    running_sshd,
    sshd_missing,
)

pytestmark = pytest.mark.slow
HOSTS = f'["127.0.0.1", "{REMOTE}"]'
# A long first prompt (more than one 256-token block of the disk tier, and a tail): what the
# disk tier saves after a restart is its prefill.
FIRST = "one two three four five six seven eight nine ten " * 40


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    reason = sshd_missing()
    if reason:
        pytest.skip(reason)
    with running_sshd(tmp_path_factory.mktemp("sshd")) as daemon:
        yield daemon


@pytest.fixture
def group(tmp_path: Path, patched_runtime, sshd: Sshd, demo_model: Path) -> Iterator[GroupProject]:
    """A project set up as the README says: config init, the model and port, the table."""
    proj = make_group_project(tmp_path, patched_runtime.root, patched_runtime.python, sshd.bin_dir)
    (proj.root / "local-models" / "demo").symlink_to(demo_model)
    edits = {"model": '"demo"', "port": str(proj.port), "max_tokens": "6", "start_timeout": "240"}
    readme_group_config(proj.root, proj.env, edits, HOSTS)
    yield proj
    proj.cli("stop")  # never leave a rank behind
    assert processes_with(f"--port {proj.port} ") == []


def chat(proj: GroupProject, messages: list[dict]):
    client = openai.OpenAI(
        base_url=f"http://127.0.0.1:{proj.port}/v1", api_key="none", max_retries=0, timeout=300
    )
    return client.chat.completions.create(
        model="mlx-local", messages=messages, max_tokens=6, temperature=0.0
    )


def status(proj: GroupProject) -> dict:
    result = proj.cli("status", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def started(proj: GroupProject) -> None:
    result = proj.cli("start")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "started" in result.stdout


def stopped(proj: GroupProject) -> None:
    result = proj.cli("stop")
    assert result.returncode == 0, result.stderr
    assert processes_with(f"--port {proj.port} ") == [], "a rank or mlx.launch survived stop"
    assert not list((proj.root / ".mlx-local" / "cluster").glob("rank-*.pid"))


def test_the_readme_steps_start_a_group(group: GroupProject) -> None:
    checked = group.cli("cluster", "check", timeout=240)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "2 ranks are ready" in checked.stdout
    started(group)
    reply = chat(group, [{"role": "user", "content": "Hello there"}])
    assert reply.model == "mlx-local" and reply.usage.completion_tokens > 0
    ranks = status(group)["ranks"]
    assert [(r["rank"], r["host"], r["alive"]) for r in ranks] == [
        (0, "127.0.0.1", True),
        (1, REMOTE, True),
    ]
    shown = group.cli("status")
    assert shown.returncode == 0 and "rank 1" in shown.stdout
    stopped(group)


def test_a_restarted_group_is_warm_on_every_rank(group: GroupProject) -> None:
    """Two ranks, a turn, `stop`, `start`: the next turn processes only its new tokens (the
    ranks agree on what they load), answers as the cold group did, and `status` shows each
    rank's own disk tier."""
    if not group_disk.server_keeps_ranks(Project(group.root)):
        pytest.skip("the server in mlx-lm-repo/ does not keep the disk prompt cache per rank")
    started(group)
    first = [{"role": "user", "content": FIRST}]
    cold = chat(group, first)
    answer = cold.choices[0].message.content
    assert cold.usage.prompt_tokens_details.cached_tokens == 0
    stopped(group)  # a clean stop writes every cache entry to disk, on every rank
    folder = group.root / ".cache" / "prompt-cache"
    shards = sorted(p.name.split("-", 1)[1] for p in folder.glob("*-rank*"))
    assert shards == ["rank0of2-tensor", "rank1of2-tensor"], list(folder.iterdir())
    started(group)
    disk = [rank["disk"] for rank in status(group)["ranks"]]
    assert all(d is not None and d["entries"] >= 1 and d["blocks"] >= 1 for d in disk), disk
    # each rank holds its own shard: about half a single rank's entry, not a copy of it
    assert abs(disk[0]["bytes"] - disk[1]["bytes"]) < 0.25 * disk[0]["bytes"], disk
    shown = group.cli("status")
    assert "disk tier" in shown.stdout, shown.stdout
    follow = [
        *first,
        {"role": "assistant", "content": answer},
        {"role": "user", "content": "And then?"},
    ]
    warm = chat(group, first)  # the same turn again, after the restart: from disk
    assert warm.choices[0].message.content == answer
    cached = warm.usage.prompt_tokens_details.cached_tokens
    assert cached >= cold.usage.prompt_tokens - 8, (cached, cold.usage.prompt_tokens)
    # every rank loaded its own shard of the same prefix (their log lines, through mlx.launch)
    loads = disk_log(group.root, LOADED)
    assert sorted(rank for _, rank, _ in loads) == [0, 1], loads
    assert len({tokens for tokens, _, _ in loads}) == 1 and loads[0][0] >= cached, loads
    nxt = chat(group, follow)
    assert nxt.usage.prompt_tokens_details.cached_tokens >= cached
    stopped(group)

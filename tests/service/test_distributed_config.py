"""The [distributed] table: validation lines, defaults, the hostfile, and the launch command."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from mlx_local import config
from mlx_local.errors import UserError
from mlx_local.project import Project
from mlx_local.service import cluster
from mlx_local.service.command import build_command


def project_with(tmp_path: Path, text: str) -> Project:
    root = tmp_path / "proj"
    (root / "local-models" / "m").mkdir(parents=True)
    (root / "config.toml").write_text('model = "m"\n' + text)
    return Project(root)


def problems(tmp_path: Path, text: str) -> list[str]:
    proj = project_with(tmp_path, text)
    with pytest.raises(UserError) as raised:
        config.load(proj)
    return str(raised.value).splitlines()[1:]


def test_no_table_is_one_machine_as_before(tmp_path: Path) -> None:
    loaded = config.load(project_with(tmp_path, ""))
    assert loaded.distributed is None
    assert loaded.options["prompt_cache_dir"].endswith(".cache/prompt-cache")


def test_a_group_with_defaults(tmp_path: Path) -> None:
    proj = project_with(tmp_path, '[distributed]\nhosts = ["127.0.0.1", "10.0.0.2"]\n')
    group = config.load(proj).distributed
    assert group.hosts == ("127.0.0.1", "10.0.0.2")
    assert (group.backend, group.mode, group.remote_root) == ("ring", "tensor", proj.root)
    python = Path("/venv/bin/python")
    assert group.python_of_others(proj.root, python) == python
    assert "prompt_cache_dir" not in config.load(proj).options  # off under a group


def test_every_bad_value_is_one_line(tmp_path: Path) -> None:
    lines = problems(
        tmp_path,
        'adapter_path = "a"\n[distributed]\nhosts = ["only-one"]\nbackend = "tcp"\n'
        'mode = "both"\nremote_root = "relative"\nstarting_port = 80\nenv = {"1X" = "y"}\n'
        "colour = 1\n",
    )
    text = "\n".join(lines)
    for expected in (
        'distributed.hosts = ["only-one"] is not allowed',
        'distributed.backend = "tcp" is not allowed; allowed: one of "ring", "jaccl"',
        'distributed.mode = "both" is not allowed; allowed: one of "tensor", "pipeline"',
        "distributed.remote_root must be an absolute path",
        "distributed.starting_port must be an integer from 1024 to 65000",
        "distributed.env must be a table",
        "unknown key 'distributed.colour'",
        "adapter_path is set but [distributed] is on",
    ):
        assert expected in text, text
    assert len(lines) == 8


def test_hosts_and_hostfile_exclude_each_other(tmp_path: Path) -> None:
    (tmp_path / "h.json").write_text("[]")
    lines = problems(
        tmp_path, f'[distributed]\nhosts = ["a", "b"]\nhostfile = "{tmp_path}/h.json"\n'
    )
    assert any("set exactly one of hosts and hostfile" in line for line in lines)


def test_the_hostfile_of_distributed_config(tmp_path: Path) -> None:
    hostfile = {
        "backend": "jaccl",
        "envs": [],
        "hosts": [
            {"ssh": "mac1.local", "ips": ["10.0.0.1"], "rdma": [None, "rdma_en3"]},
            {"ssh": "mac2.local", "ips": ["10.0.0.2"], "rdma": ["rdma_en3", None]},
        ],
    }
    proj = project_with(tmp_path, '[distributed]\nhostfile = "hosts.json"\n')
    (proj.root / "hosts.json").write_text(json.dumps(hostfile))
    group = config.load(proj).distributed
    assert group.hosts == ("mac1.local", "mac2.local")
    assert group.backend == "jaccl"  # from the hostfile unless the table names one
    assert group.hostfile == proj.root / "hosts.json"


def test_the_rank_prologue_runs_each_rank_in_its_project(tmp_path: Path) -> None:
    """The rank part of the launch command, run by sh as mlx.launch runs it (MLX_RANK set);
    the "python" is a script that prints what the server would see."""
    proj = project_with(
        tmp_path,
        'api_key = "s3cret"\n[distributed]\nhosts = ["127.0.0.1", "127.0.0.1"]\n'
        f'mode = "pipeline"\nremote_root = "{tmp_path}/other root"\n'
        f'remote_python = "{tmp_path}/bin/python"\n',
    )
    loaded = config.load(proj)
    (tmp_path / "other root").mkdir()
    python = tmp_path / "bin" / "python"
    python.parent.mkdir()
    python.write_text('#!/bin/sh\necho "key=${MLX_LM_API_KEY-unset} cwd=$(pwd) args=$*"\n')
    python.chmod(0o755)
    server = build_command(loaded, proj, python)
    launch = cluster.launch_command(proj, loaded.distributed, python, server)
    assert launch.argv[:3] == [str(tmp_path / "bin" / "mlx.launch"), "--backend", "ring"]
    assert launch.argv[3:5] == ["--hosts", "127.0.0.1,127.0.0.1"]
    assert launch.argv[-1] == "--pipeline"
    assert "s3cret" not in launch.display()
    key = cluster.key_file(proj)
    key.parent.mkdir(parents=True)
    key.write_text("s3cret")
    rank_part = launch.argv[launch.argv.index("--") + 1 :]
    for rank, root, seen in ((0, proj.root, "s3cret"), (1, tmp_path / "other root", "unset")):
        env = {"PATH": "/usr/bin:/bin", "MLX_RANK": str(rank), "MLX_LM_API_KEY": "inherited"}
        out = subprocess.run(rank_part, env=env, capture_output=True, text=True, check=True)
        assert out.stdout.startswith(f"key={seen} cwd={root} args=-m mlx_lm.server --model ")
        assert "--model local-models/m " in out.stdout  # relative: each rank's own project
        pid = (root / ".mlx-local" / "cluster" / f"rank-{rank}.pid").read_text().strip()
        assert pid.isdigit()

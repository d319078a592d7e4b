"""The [distributed] table: validation lines, defaults, the hostfile, and the launch command."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from mlx_local import config, config_distributed
from mlx_local.errors import UserError
from mlx_local.project import Project
from mlx_local.service import cluster, group_disk
from mlx_local.service.command import build_command
from tests.helpers import run_cli
from tests.service.distributed_helpers import (
    readme_group_config,
    readme_group_table,
    upstream_checkout,
)


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


def launch_of(proj: Project, loaded: config.Config) -> list[str]:
    python = Path("/venv/bin/python")
    loaded = group_disk.settle(loaded, proj)
    return cluster.launch_command(
        proj, loaded.distributed, python, build_command(loaded, proj, python)
    ).argv


def test_config_init_then_the_readme_table(
    tmp_path: Path, patched_runtime, stand_in_upstream: Path
) -> None:
    """The README's next step after `config init` never fails: the disk prompt cache left at
    its default (config init writes the default folder and budget out) is no problem."""
    root = tmp_path / "proj"
    (root / "local-models" / "m").mkdir(parents=True)
    written = readme_group_config(root, {}, {"model": '"m"'}, '["127.0.0.1", "10.0.0.2"]')
    assert 'prompt_cache_dir = ".cache/prompt-cache"' in written  # as config init writes it
    checked = run_cli(["config", "check", "--no-probe"], root)
    assert checked.returncode == 0, checked.stderr
    proj = Project(root)
    loaded = config.load(proj)
    assert loaded.distributed.hosts == ("127.0.0.1", "10.0.0.2")
    assert "prompt_cache_dir" not in loaded.explicit  # the default, written out
    # the patched server (patch 0005 keeps the tier per rank): every rank its own project's
    # folder, the same budget (each rank's)
    (root / "mlx-lm-repo").symlink_to(patched_runtime.root / "mlx-lm-repo")
    if group_disk.server_keeps_ranks(proj):
        assert group_disk.settle(loaded, proj) == loaded
        argv = launch_of(proj, loaded)
        at = argv.index("--prompt-cache-dir")
        assert argv[at : at + 4] == [
            "--prompt-cache-dir",
            ".cache/prompt-cache",
            "--prompt-cache-dir-bytes",
            "10G",
        ]
    # a server without it: the default tier is off (a note), never a refusal
    upstream_checkout(root, stand_in_upstream)
    settled = group_disk.settle(loaded, proj)
    assert "prompt_cache_dir" not in settled.options
    assert "prompt_cache_dir_bytes" not in settled.options
    assert any("does not keep it per rank" in note for note in settled.notes)
    assert "--prompt-cache-dir" not in launch_of(proj, loaded)


def test_an_explicit_disk_folder_needs_a_server_that_keeps_ranks(
    tmp_path: Path, stand_in_upstream: Path
) -> None:
    proj = project_with(
        tmp_path, 'prompt_cache_dir = "/var/tmp/pc"\n[distributed]\nhosts = ["a", "b"]\n'
    )
    loaded = config.load(proj)
    assert "prompt_cache_dir" in loaded.explicit
    upstream_checkout(proj.root, stand_in_upstream)
    with pytest.raises(UserError) as refused:
        group_disk.settle(loaded, proj)
    message = str(refused.value)
    assert len(message.splitlines()) == 1
    assert message.startswith("prompt_cache_dir is set but [distributed] is on")
    assert "run setup-repo" in message and "prompt_cache_dir = false" in message


def test_a_disk_budget_alone_never_blocks_a_group(tmp_path: Path, stand_in_upstream: Path) -> None:
    for text in (
        'prompt_cache_dir = false\nprompt_cache_dir_bytes = "1G"\n',
        'prompt_cache_dir_bytes = "1G"\n',
    ):
        proj = project_with(tmp_path / str(len(text)), text + '[distributed]\nhosts = ["a", "b"]\n')
        upstream_checkout(proj.root, stand_in_upstream)
        settled = group_disk.settle(config.load(proj), proj)
        assert "prompt_cache_dir_bytes" not in settled.options
        assert settled.notes  # why it has no effect


def test_the_readme_table_is_what_the_config_takes(tmp_path: Path) -> None:
    """Every key of the README's example, uncommented, is a key of [distributed]."""
    lines = readme_group_table().splitlines()
    keys = {line.lstrip("# ").split(" ")[0] for line in lines if " = " in line}
    assert keys <= set(config_distributed.KEYS) | {"MLX_METAL_FAST_SYNCH"}, keys

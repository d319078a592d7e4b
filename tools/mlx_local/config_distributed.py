"""The optional [distributed] table: one model served by a group of processes (ranks).

Absent table: one machine, exactly as without it. Present: `serve` runs the patched server
under `mlx.launch`, one rank per host entry; rank 0 (the first host, this machine) serves HTTP.

    [distributed]
    hosts = ["127.0.0.1", "192.168.2.2"]   # or hostfile = "hosts.json" (mlx.distributed_config)
    backend = "ring"                       # ring, jaccl, mpi; nccl where mlx runs on CUDA
    mode = "tensor"                        # or "pipeline" (layers split across ranks)
    remote_root = "/Users/me/mlx-local"    # this project on the other hosts (default: same path)
    remote_python = "/Users/me/mlx-local/.venv/bin/python"  # default: see Distributed
    starting_port = 32323                  # first TCP port of the ring/jaccl backends
    [distributed.env]                      # extra environment of every rank
    MLX_METAL_FAST_SYNCH = "1"
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BACKENDS = ("ring", "jaccl", "mpi", "nccl")
MODES = ("tensor", "pipeline")
KEYS = (
    "hosts",
    "hostfile",
    "backend",
    "mode",
    "remote_root",
    "remote_python",
    "starting_port",
    "env",
)
LOCAL_HOST = "127.0.0.1"  # mlx.launch starts ranks on this host without ssh
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Server options a group cannot use (mlx_lm.server refuses adapters and draft models there).
UNSUPPORTED = ("adapter_path", "draft_model")


@dataclass(frozen=True)
class Distributed:
    """A validated [distributed] table."""

    hosts: tuple[str, ...]  # ssh name of each rank, in rank order
    backend: str
    mode: str
    remote_root: Path
    remote_python: Path | None  # None: <remote_root>/.venv/bin/python, or rank 0's python
    hostfile: Path | None = None
    starting_port: int | None = None
    env: dict[str, str] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return len(self.hosts)

    def python_of_others(self, root: Path, python: Path) -> Path:
        """The python of ranks 1.. when rank 0 runs `python` in the project at `root`: the
        configured one, else the same path when the project sits at the same path."""
        if self.remote_python is not None:
            return self.remote_python
        return python if self.remote_root == root else self.remote_root / ".venv" / "bin" / "python"


def _hostfile(path: Path) -> tuple[list[str], str | None]:
    """The ssh names and backend of a hostfile of `mlx.distributed_config` (or ValueError)."""
    try:
        data = json.loads(path.read_text("utf-8"))
    except OSError as error:
        raise ValueError(f"cannot read {path}: {error.strerror}") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not JSON: {error}") from None
    hosts = data.get("hosts") if isinstance(data, dict) else data
    if not isinstance(hosts, list) or not all(
        isinstance(h, dict) and isinstance(h.get("ssh"), str) for h in hosts
    ):
        raise ValueError(f'{path} has no "hosts" list of {{"ssh": ..., "ips": [...]}} entries')
    backend = data.get("backend") if isinstance(data, dict) else None
    return [h["ssh"] for h in hosts], backend or None


def validate(table: Any, root: Path) -> list[str]:
    """Every problem of a [distributed] table, one line each."""
    if not isinstance(table, dict):
        return ["distributed must be a table: [distributed]"]
    problems = [
        f"unknown key 'distributed.{k}'; allowed in [distributed]: {', '.join(KEYS)}"
        for k in table
        if k not in KEYS
    ]
    hosts, hostfile = table.get("hosts"), table.get("hostfile")
    if (hosts is None) == (hostfile is None):
        problems.append("distributed: set exactly one of hosts and hostfile")
    if hosts is not None and (
        not isinstance(hosts, list)
        or len(hosts) < 2
        or not all(isinstance(h, str) and h.strip() for h in hosts)
    ):
        problems.append(
            f"distributed.hosts = {json.dumps(hosts)} is not allowed; allowed: a list of two or "
            'more host names or IPs, this machine first, e.g. ["127.0.0.1", "192.168.2.2"]'
        )
    if isinstance(hostfile, str):
        try:
            if len(_hostfile(_path(hostfile, root))[0]) < 2:
                problems.append(f"distributed.hostfile {hostfile} lists fewer than two hosts")
        except ValueError as error:
            problems.append(f"distributed.hostfile: {error}")
    elif hostfile is not None:
        problems.append("distributed.hostfile must be a path (the JSON of mlx.distributed_config)")
    for key, choices in (("backend", BACKENDS), ("mode", MODES)):
        if key in table and table[key] not in choices:
            problems.append(
                f"distributed.{key} = {json.dumps(table[key])} is not allowed; allowed: one of "
                + ", ".join(json.dumps(c) for c in choices)
            )
    for key in ("remote_root", "remote_python"):
        if key in table and not (isinstance(table[key], str) and table[key].startswith(("/", "~"))):
            problems.append(f"distributed.{key} must be an absolute path")
    port = table.get("starting_port")
    if port is not None and not (
        isinstance(port, int) and not isinstance(port, bool) and 1024 <= port <= 65000
    ):
        problems.append("distributed.starting_port must be an integer from 1024 to 65000")
    env = table.get("env", {})
    if not isinstance(env, dict) or not all(
        _ENV_NAME.match(k) and isinstance(v, str | int | float) for k, v in env.items()
    ):
        problems.append("distributed.env must be a table of NAME = value (strings or numbers)")
    return problems


def _path(value: str, root: Path) -> Path:
    path = Path(os.path.expanduser(value))
    return path if path.is_absolute() else root / path


def server_problems(data: dict[str, Any]) -> list[str]:
    """Problems of server options that a group cannot honour (the merged config)."""
    if "distributed" not in data:
        return []
    return [
        f"{key} is set but [distributed] is on; allowed: one of them (mlx_lm.server does not "
        "load adapters or draft models in a group)"
        for key in UNSUPPORTED
        if key in data
    ]


def parse(table: dict[str, Any], root: Path) -> Distributed:
    """A validated table (see `validate`) as a Distributed; relative paths: from `root`."""
    hostfile = _path(table["hostfile"], root) if "hostfile" in table else None
    hosts, file_backend = _hostfile(hostfile) if hostfile else (list(table["hosts"]), None)
    remote_root = Path(os.path.expanduser(table.get("remote_root", str(root))))
    python = table.get("remote_python")
    return Distributed(
        hosts=tuple(hosts),
        backend=table.get("backend", file_backend or "ring"),
        mode=table.get("mode", "tensor"),
        remote_root=remote_root,
        remote_python=Path(os.path.expanduser(python)) if python else None,
        hostfile=hostfile,
        starting_port=table.get("starting_port"),
        env={k: str(v) for k, v in table.get("env", {}).items()},
    )

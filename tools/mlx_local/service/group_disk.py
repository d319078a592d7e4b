"""The disk prompt cache of a [distributed] group: each rank keeps its own shard (patch 0005).

Every rank gets the same `--prompt-cache-dir` (relative to its own project when the folder is
inside this one, like `--model`) and `--prompt-cache-dir-bytes` (each rank's own budget). The
server keeps rank R of an N-rank group in `DIR/<digest>-rank<R>ofN-<mode>/`: blocks
`b-*.safetensors`, one tail `t*.safetensors` per stored conversation, `.tmp-*` writes in
progress. A checkout whose server does not keep it per rank (no "per rank in a group" in its
source): an explicit folder is refused with one line, the default is off.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, replace
from pathlib import PurePosixPath

from ..config import Config
from ..errors import UserError
from ..project import Project
from . import cluster

PER_RANK_MARK = "per rank in a group"  # in the --prompt-cache-dir help of such a server
DISK_KEYS = ("prompt_cache_dir", "prompt_cache_dir_bytes")

# Run on one host: $N and $MODE set, then "rank folder" argument pairs; prints
# "rank entries blocks bytes" per rank (files of writes in progress are not counted).
USAGE_SCRIPT = """\
while [ $# -ge 2 ]; do
  r=$1; d=$2; shift 2
  ls -ln "$d"/*-rank"$r"of"$N"-"$MODE" 2>/dev/null | awk -v r="$r" '
    $NF ~ /^b-.*[.]safetensors$/ { b++; s += $5 }
    $NF ~ /^t.*[.]safetensors$/ { t++; s += $5 }
    END { printf "%s %d %d %.0f\\n", r, t, b, s }'
done
"""


@dataclass(frozen=True)
class RankDisk:
    """One rank's disk tier: stored conversations (tails), blocks, and their bytes."""

    entries: int
    blocks: int
    bytes: int


def server_keeps_ranks(project: Project) -> bool | None:
    """Whether the server in mlx-lm-repo/ keeps the disk prompt cache per rank (None: there
    is no checkout to ask; setup-repo first)."""
    source = project.checkout_dir / "mlx_lm" / "server.py"
    if not source.is_file():
        return None
    return PER_RANK_MARK in source.read_text("utf-8")


def settle(config: Config, project: Project) -> Config:
    """The config a group runs: as it is when the server keeps the disk tier per rank (or
    the tier is off, or there is no checkout yet); else the default tier off, and an
    explicit folder refused."""
    if config.distributed is None or not config.options.get("prompt_cache_dir"):
        return config
    if server_keeps_ranks(project) is not False:
        return config
    if "prompt_cache_dir" in config.explicit:
        raise UserError(
            "prompt_cache_dir is set but [distributed] is on and the server in mlx-lm-repo/ "
            "does not keep the disk prompt cache per rank; allowed: run setup-repo (patch "
            "0005), or prompt_cache_dir = false"
        )
    options = {k: v for k, v in config.options.items() if k not in DISK_KEYS}
    note = "the disk prompt cache is off: the server in mlx-lm-repo/ does not keep it per rank"
    return replace(config, options=options, notes=(*config.notes, note))


def rank_folder(project: Project, config: Config, rank: cluster.Rank) -> PurePosixPath | None:
    """The --prompt-cache-dir of `rank` as its host sees it (None: the tier is off)."""
    folder = config.options.get("prompt_cache_dir")
    if not folder or config.distributed is None:
        return None
    relative = cluster.in_rank_project(folder, project)
    if PurePosixPath(relative).is_absolute():
        return PurePosixPath(relative)
    root = project.root if rank.rank == 0 else config.distributed.remote_root
    return PurePosixPath(root) / relative


def usage(project: Project, config: Config) -> dict[int, RankDisk]:
    """Each rank's disk tier, read from its folder on its host (ranks that cannot be read
    are left out)."""
    group = config.distributed
    if group is None or not config.options.get("prompt_cache_dir"):
        return {}
    found: dict[int, RankDisk] = {}
    by_host: dict[str, list[cluster.Rank]] = {}
    for rank in cluster.ranks(project, group):
        by_host.setdefault(rank.host, []).append(rank)
    for host, on_host in by_host.items():
        pairs = [str(part) for r in on_host for part in (r.rank, rank_folder(project, config, r))]
        script = f"N={group.size}\nMODE={group.mode}\n{USAGE_SCRIPT}"
        try:
            result = subprocess.run(
                cluster.ssh_command(host, script, *pairs),
                capture_output=True,
                text=True,
                timeout=cluster.SSH_TIMEOUT,
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        for line in result.stdout.splitlines():
            fields = line.split()
            if len(fields) == 4 and all(f.isdigit() for f in fields):
                found[int(fields[0])] = RankDisk(*(int(f) for f in fields[1:]))
    return found

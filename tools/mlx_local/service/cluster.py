"""A group of server ranks under `mlx.launch`: its command line, and each rank's pid file.

`mlx.launch` starts one process per host entry (over ssh unless the host is 127.0.0.1). Each
rank runs a short `sh` prologue before it becomes `python -m mlx_lm.server`: it enters the
project (this one for rank 0, `remote_root` for the others), writes its pid to
`.mlx-local/cluster/rank-N.pid` there, and rank 0 alone reads the API key from a 0600 file.
The pid files are how `stop` and `status` reach every rank on every host, whatever happened
to `mlx.launch` itself (it leaves its ranks running when it gets SIGTERM).
"""

from __future__ import annotations

import shlex
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ..config import API_KEY_ENV
from ..config_distributed import LOCAL_HOST, Distributed
from ..project import Project
from .command import ServerCommand

RANK_DIR = PurePosixPath(".mlx-local") / "cluster"  # under each host's project root
KEY_FILE = "api-key"
SSH_OPTIONS = ("-o", "BatchMode=yes", "-o", "ConnectTimeout=5")
SSH_TIMEOUT = 30.0
# Server options naming a folder of the project: each rank takes its own project's.
RANK_PATHS = ("--model", "--prompt-cache-dir")

# $1: rank 0's project root, $2: its python, $3/$4: the same for the other ranks; then the
# server's arguments. The pid written is the server's: `exec` keeps it.
RANK_PROLOGUE = f"""\
if [ "$MLX_RANK" = 0 ]; then root=$1; py=$2; else root=$3; py=$4; fi
shift 4
cd "$root" || exit 70
mkdir -p {RANK_DIR} && echo $$ > {RANK_DIR}/rank-$MLX_RANK.pid || exit 71
unset {API_KEY_ENV}
if [ "$MLX_RANK" = 0 ] && [ -f {RANK_DIR}/{KEY_FILE} ]; then
  {API_KEY_ENV}=$(cat {RANK_DIR}/{KEY_FILE}); export {API_KEY_ENV}
fi
exec "$py" "$@"
"""

# Run on one host with the pid files of its ranks as arguments and $ACTION one of status,
# TERM, KILL; prints "file pid alive rss_kib" per file and removes files of dead ranks.
HOST_SCRIPT = """\
for f in "$@"; do
  [ -f "$f" ] || { echo "$f - 0 0"; continue; }
  p=$(cat "$f")
  line=$(ps -ww -o stat=,rss=,command= -p "$p" 2>/dev/null)
  case "$line" in
    Z*|"") echo "$f $p 0 0"; rm -f "$f"; continue ;;
  esac
  case "$line" in *mlx_lm.server*) ;; *) echo "$f $p 0 0"; rm -f "$f"; continue ;; esac
  [ "$ACTION" = status ] || kill -s "$ACTION" "$p" 2>/dev/null
  set -- $line
  echo "$f $p 1 $2"
done
"""


@dataclass(frozen=True)
class Rank:
    """One process of the group: its rank, the host mlx.launch starts it on, its pid file."""

    rank: int
    host: str
    pid_file: PurePosixPath

    @property
    def local(self) -> bool:
        """Started without ssh (mlx.launch treats only 127.0.0.1 so)."""
        return self.host == LOCAL_HOST


@dataclass(frozen=True)
class RankState:
    """What a rank's host says about it."""

    rank: int
    host: str
    pid: int | None
    alive: bool
    rss_bytes: int | None
    error: str = ""


def ranks(project: Project, group: Distributed) -> list[Rank]:
    """The ranks of `group` in rank order."""
    result = []
    for index, host in enumerate(group.hosts):
        root = PurePosixPath(project.root) if index == 0 else PurePosixPath(group.remote_root)
        result.append(Rank(index, host, root / RANK_DIR / f"rank-{index}.pid"))
    return result


def launcher(python: Path) -> Path:
    """The `mlx.launch` of the runtime venv (next to its python)."""
    return python.parent / "mlx.launch"


def in_rank_project(argument: str, project: Project) -> str:
    """A path every rank can use (--model, --prompt-cache-dir): relative to its project when
    under this one (each rank runs in its own project), else as it is."""
    path = Path(argument)
    if path.is_absolute() and path.is_relative_to(project.root):
        return str(path.relative_to(project.root))
    return argument


def launch_command(
    project: Project, group: Distributed, python: Path, server: ServerCommand
) -> ServerCommand:
    """The `mlx.launch` command that runs `server` on every rank of `group`."""
    args = server.argv[1:]  # -m mlx_lm.server ...
    for option in RANK_PATHS:
        if option in args:
            at = args.index(option) + 1
            args[at] = in_rank_project(args[at], project)
    if group.mode == "pipeline":
        args.append("--pipeline")
    argv = [str(launcher(python)), "--backend", group.backend]
    if group.hostfile is not None:
        argv += ["--hostfile", str(group.hostfile)]
    else:
        argv += ["--hosts", ",".join(group.hosts)]
    if group.starting_port is not None:
        argv += ["--starting-port", str(group.starting_port)]
    for name, value in sorted(group.env.items()):
        argv += ["--env", f"{name}={value}"]
    argv += ["--", "/bin/sh", "-c", RANK_PROLOGUE, "mlx-local-rank"]
    others = group.python_of_others(project.root, python)
    argv += [str(project.root), str(python), str(group.remote_root), str(others)]
    return LaunchCommand(argv=argv + args, env=dict(server.env), model=server.model)


class LaunchCommand(ServerCommand):
    """The mlx.launch command of a group (the API key reaches rank 0 through a file)."""

    def display(self) -> str:
        """The exact command line as a shell would take it."""
        return shlex.join(self.argv)


def key_file(project: Project) -> Path:
    """Rank 0's API key file (rank 0 runs in this project)."""
    return project.root / RANK_DIR / KEY_FILE


def ssh_command(host: str, script: str, *args: str) -> list[str]:
    """argv that runs `sh -c script sh args...` on `host` (locally for 127.0.0.1)."""
    if host == LOCAL_HOST:
        return ["/bin/sh", "-c", script, "sh", *args]
    remote = " ".join(shlex.quote(p) for p in ["sh", "-c", script, "sh", *args])
    return ["ssh", *SSH_OPTIONS, host, remote]


def _by_host(rank_list: list[Rank]) -> dict[str, list[Rank]]:
    hosts: dict[str, list[Rank]] = {}
    for rank in rank_list:
        hosts.setdefault(rank.host, []).append(rank)
    return hosts


def signal_ranks(rank_list: list[Rank], action: str = "status") -> list[RankState]:
    """Ask each host about its ranks, sending `action` (TERM, KILL) to the live ones."""
    states = []
    for host, on_host in _by_host(rank_list).items():
        files = [str(rank.pid_file) for rank in on_host]
        argv = ssh_command(host, f"ACTION={action}\n{HOST_SCRIPT}", *files)
        try:
            result = subprocess.run(argv, capture_output=True, text=True, timeout=SSH_TIMEOUT)
            rows = [line.rsplit(" ", 3) for line in result.stdout.splitlines()]
            lines = {row[0]: row[1:] for row in rows if len(row) == 4}
            error = "" if result.returncode == 0 else (result.stderr.strip() or "ssh failed")
        except (OSError, subprocess.TimeoutExpired) as failure:
            lines, error = {}, str(failure)
        for rank in on_host:
            fields = lines.get(str(rank.pid_file), ["-", "0", "0"])
            pid = int(fields[0]) if fields[0].isdigit() else None
            alive = fields[1] == "1"
            rss = int(fields[2]) * 1024 if alive and fields[2].isdigit() else None
            states.append(RankState(rank.rank, host, pid, alive, rss, error))
    return sorted(states, key=lambda s: s.rank)


def stop_ranks(rank_list: list[Rank], timeout: float, poll: float = 0.5) -> list[RankState]:
    """SIGTERM every live rank, SIGKILL those still alive after `timeout`; the final states."""
    states = signal_ranks(rank_list, "TERM")
    deadline = time.monotonic() + timeout
    while any(s.alive for s in states) and time.monotonic() < deadline:
        time.sleep(poll)
        states = signal_ranks(rank_list)
    if any(s.alive for s in states):
        signal_ranks([r for r, s in zip(rank_list, states, strict=True) if s.alive], "KILL")
        time.sleep(poll)
        states = signal_ranks(rank_list)
    return states

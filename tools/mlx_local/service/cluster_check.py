"""`cluster check`: can this [distributed] group start? One line per problem, with its fix.

Every host is asked (over ssh, as mlx.launch will) for its project commit, patch queue,
mlx-lm base, mlx version, the model and its memory; each answer is compared with rank 0's
(this machine).
"""

from __future__ import annotations

import ipaddress
import json
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ..config_distributed import LOCAL_HOST, Distributed
from ..project import Project
from . import cluster

GIB = 2**30
USABLE_MEMORY = 0.75  # macOS lets the GPU wire about this share of the memory by default

# Run by each host's python in its project root; argv: root, model. Prints one JSON object.
PROBE = r"""
import hashlib, importlib.metadata as md, json, os, subprocess, sys
root, model = sys.argv[1], sys.argv[2]
def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None
def git(*args):
    try:
        out = subprocess.run(["git", "-C", root, *args], capture_output=True, text=True)
        return out.stdout.strip() or None
    except OSError:
        return None
queue = hashlib.sha256()
patches = os.path.join(root, "patches")
for name in sorted(os.listdir(patches)) if os.path.isdir(patches) else []:
    if name.endswith(".patch") or name == "series":
        with open(os.path.join(patches, name), "rb") as handle:
            queue.update(name.encode() + b"\0" + handle.read())
path = model if os.path.isabs(model) else os.path.join(root, model)
weights = None
if os.path.isfile(os.path.join(path, "config.json")):
    weights = sum(
        os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)
        if f.endswith(".safetensors")
    )
print(json.dumps({
    "commit": git("rev-parse", "HEAD"),
    "queue": queue.hexdigest()[:12] if os.path.isdir(patches) else None,
    "mlx_lm": version("mlx-lm"),
    "mlx": version("mlx"),
    "model_path": path,
    "weights": weights,
    "memory": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
}))
"""


@dataclass(frozen=True)
class Probe:
    """What one host said (or why it could not be asked)."""

    host: str
    root: str
    python: str
    facts: dict | None
    error: str = ""
    unreachable: bool = False


def probe(host: str, root: str, python: str, model: str) -> Probe:
    """Ask `host` about its project at `root` with its `python`."""
    script = 'cd "$1" || exit 70; shift; exec "$@"'
    argv = cluster.ssh_command(host, script, root, python, "-c", PROBE, root, model)
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=cluster.SSH_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as error:
        return Probe(host, root, python, None, str(error), unreachable=host != LOCAL_HOST)
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines() or [f"exit code {result.returncode}"]
        unreachable = host != LOCAL_HOST and result.returncode == 255  # ssh's own failure
        return Probe(host, root, python, None, lines[-1], unreachable)
    try:
        return Probe(host, root, python, json.loads(result.stdout.strip().splitlines()[-1]))
    except (ValueError, IndexError):
        return Probe(host, root, python, None, "no answer from the probe")


def is_this_machine(host: str) -> bool:
    """Whether `host` names this machine (an address a socket here can bind to)."""
    try:
        address = socket.gethostbyname(host)
        with socket.socket() as sock:
            sock.bind((address, 0))
        return True
    except OSError:
        return False


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def _gib(value: float) -> str:
    return f"{value / GIB:.1f} GiB"


def _compare(here: Probe, there: Probe, model: str) -> list[str]:
    """Problems of `there` against rank 0's `here`, one line each with its fix."""
    h, t, host = here.facts or {}, there.facts or {}, there.host
    on = f"ssh {host} " if host != LOCAL_HOST else ""
    at = f"cd {there.root} && "
    problems = []
    if t["commit"] != h["commit"]:
        problems.append(
            f"{host}: project at commit {str(t['commit'])[:12]}, rank 0 at "
            f"{str(h['commit'])[:12]}; fix: {on}'{at}git fetch && git checkout {h['commit']}'"
        )
    if t["queue"] != h["queue"] or t["mlx_lm"] != h["mlx_lm"]:
        problems.append(
            f"{host}: patch queue {t['queue']} on mlx-lm {t['mlx_lm'] or '(not installed)'}, "
            f"rank 0 has {h['queue']} on mlx-lm {h['mlx_lm']}; fix: "
            f"{on}'{at}.venv/bin/setup-repo' (same commit first)"
        )
    if t["mlx"] != h["mlx"]:
        problems.append(
            f"{host}: mlx {t['mlx']}, rank 0 has mlx {h['mlx']}; fix: "
            f"{on}'{there.python} -m pip install mlx=={h['mlx']}'"
        )
    if h["weights"] is not None and t["weights"] != h["weights"]:
        what = "missing" if t["weights"] is None else "different (other weights size)"
        target = f"{host}:{t['model_path']}" if host != LOCAL_HOST else t["model_path"]
        problems.append(
            f"{host}: model {model} is {what} at {t['model_path']}; fix: "
            f"rsync -a {h['model_path']}/ {target}/"
        )
    return problems


def _memory(probes: list[Probe], group: Distributed, weights: int | None) -> list[str]:
    if not weights:
        return []
    problems = []
    share = weights / group.size
    for item in probes:
        ranks_here = sum(1 for h in group.hosts if h == item.host)
        need = share * ranks_here
        usable = (item.facts or {}).get("memory", 0) * USABLE_MEMORY
        if item.facts and need > usable:
            problems.append(
                f"{item.host}: its {ranks_here} rank(s) need about {_gib(need)} for weights "
                f"({_gib(weights)} / {group.size} ranks, before the KV cache) but about "
                f"{_gib(usable)} is usable; fix: add hosts or serve a smaller model"
            )
    return problems


@dataclass(frozen=True)
class Report:
    """What `cluster check` found."""

    probes: list[Probe]
    problems: list[str]


def check(project: Project, group: Distributed, python: Path, model: str) -> Report:
    """Probe every host of `group` and list every problem (empty: ready to launch)."""
    problems = []
    if not cluster.launcher(python).exists():
        problems.append(
            f"{cluster.launcher(python)} is missing; fix: {python} -m pip install 'mlx>=0.30'"
        )
    first = group.hosts[0]
    if first != LOCAL_HOST and not is_this_machine(first):
        problems.append(
            f"{first}: rank 0 serves HTTP here, so the first host must be this machine; fix: "
            "list this machine first (127.0.0.1, or its address on the cluster network)"
        )
    if group.backend in ("ring", "jaccl") and group.hostfile is None:
        for host in dict.fromkeys(group.hosts):
            if not _is_ip(host):
                problems.append(
                    f"{host}: the {group.backend} backend needs IP addresses; fix: put its IP "
                    "in hosts, or write a hostfile with mlx.distributed_config"
                )
    ranks = cluster.ranks(project, group)
    targets = {}
    for rank in ranks:
        root = str(project.root) if rank.rank == 0 else str(group.remote_root)
        py = python if rank.rank == 0 else group.python_of_others(project.root, python)
        targets.setdefault((rank.host, root, str(py)), None)
    probes = [probe(host, root, py, model) for host, root, py in targets]
    here = probes[0]
    if here.facts is None:
        return Report(probes, problems + [f"{here.host}: cannot probe rank 0: {here.error}"])
    for item in probes[1:]:
        if item.unreachable:
            problems.append(
                f"{item.host}: not reachable over ssh ({item.error}); fix: make "
                f"`ssh {item.host} true` work without a password (ssh-copy-id {item.host})"
            )
        elif item.facts is None:
            problems.append(
                f"{item.host}: cannot run {item.python} in {item.root} ({item.error}); fix: "
                "clone the project there and run `make venv`, or set distributed.remote_root "
                "and distributed.remote_python"
            )
        else:
            problems += _compare(here, item, model)
    problems += _memory(probes, group, here.facts.get("weights"))
    return Report(probes, problems)

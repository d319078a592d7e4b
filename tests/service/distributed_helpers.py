"""Helpers of the distributed tests: a real sshd on 127.0.0.2, group projects, process checks.

sshd is Debian's openssh-server (.ci/install-test-tools), started by the tests as root on a
free port with a throwaway host key and client key. mlx.launch and mlx-local call `ssh` by
name with no way to pass options, so the tests put a two-line `ssh` first on PATH that runs
the real /usr/bin/ssh with `-F` and the test's client config (port, key, no known_hosts).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.helpers import REPO_ROOT, free_port, run_cli

SSHD = Path("/usr/sbin/sshd")
REMOTE = "127.0.0.2"  # a loopback address that only sshd answers on: ranks there use ssh
DEAD = "127.0.0.3"  # nothing answers ssh there


@dataclass(frozen=True)
class Sshd:
    """A running sshd and the PATH entry whose `ssh` reaches it."""

    bin_dir: Path
    port: int


def sshd_missing() -> str | None:
    """Why a test sshd cannot run here, or None."""
    if not SSHD.exists() or not shutil.which("ssh-keygen"):
        return "openssh-server is not installed (see .ci/install-test-tools)"
    if os.geteuid() != 0:
        return "sshd for the tests needs root (it logs in as the current user)"
    return None


@contextmanager
def running_sshd(base: Path) -> Iterator[Sshd]:
    """sshd on REMOTE:port with a fresh host key and authorized client key; always stopped."""
    base.mkdir(parents=True, exist_ok=True)
    for name in ("host", "client"):
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(base / name)], check=True
        )
    shutil.copy(base / "client.pub", base / "authorized_keys")
    port = free_port()
    (base / "sshd_config").write_text(
        f"Port {port}\nListenAddress {REMOTE}\nHostKey {base / 'host'}\n"
        f"AuthorizedKeysFile {base / 'authorized_keys'}\nPidFile {base / 'sshd.pid'}\n"
        "StrictModes no\nUsePAM no\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n"
    )
    (base / "ssh_config").write_text(
        f"Host 127.0.0.*\n  Port {port}\n  User {os.environ.get('USER', 'root')}\n"
        f"  IdentityFile {base / 'client'}\n  IdentitiesOnly yes\n"
        "  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n"
        "  ConnectTimeout 5\n"
    )
    bin_dir = base / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "ssh"
    wrapper.write_text(f'#!/bin/sh\nexec /usr/bin/ssh -F "{base / "ssh_config"}" "$@"\n')
    wrapper.chmod(0o755)
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation folder
    daemon = subprocess.Popen(
        [str(SSHD), "-D", "-e", "-f", str(base / "sshd_config")],
        stdout=subprocess.DEVNULL,
        stderr=(base / "sshd.log").open("w"),
    )
    try:
        deadline = time.monotonic() + 20
        env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
        while time.monotonic() < deadline:
            probe = subprocess.run(
                ["ssh", "-o", "BatchMode=yes", REMOTE, "true"], env=env, capture_output=True
            )
            if probe.returncode == 0:
                break
            time.sleep(0.3)
        else:
            raise RuntimeError(f"sshd did not answer: {(base / 'sshd.log').read_text()}")
        yield Sshd(bin_dir, port)
    finally:
        daemon.terminate()
        daemon.wait(10)


@dataclass(frozen=True)
class GroupProject:
    """A project (borrowing a set-up checkout) whose config.toml has a [distributed] table."""

    root: Path
    port: int
    env: dict[str, str]

    def cli(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return run_cli(list(args), self.root, env=self.env, timeout=timeout)

    def write_config(self, model: Path, distributed: str, extra: str = "") -> None:
        (self.root / "config.toml").write_text(
            f'model = "{model}"\nport = {self.port}\nmax_tokens = 8\n{extra}\n'
            "[service]\nstart_timeout = 240\nstop_timeout = 10\n\n"
            f"[distributed]\n{distributed}\nstarting_port = {free_port_block()}\n"
        )

    def pid_of_rank(self, rank: int) -> int:
        return int((self.root / ".mlx-local" / "cluster" / f"rank-{rank}.pid").read_text())


def make_group_project(base: Path, runtime_root: Path, python: Path, path_dir: Path | None):
    """A GroupProject on a free port; `path_dir` (the ssh wrapper) goes first on PATH."""
    root = base / "group project"
    (root / "local-models").mkdir(parents=True)
    (root / "mlx-lm-repo").symlink_to(runtime_root / "mlx-lm-repo")
    shutil.copytree(runtime_root / "patches", root / "patches")
    env = {
        "MLX_LOCAL_PYTHON": str(python),
        "MLX_LOCAL_SERVICE_DIR": str(base / "no-service-installed"),
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(base / "hf-home"),
    }
    if path_dir is not None:
        env["PATH"] = f"{path_dir}:{os.environ['PATH']}"
    return GroupProject(root, free_port(), env)


def free_port_block(size: int = 8) -> int:
    """The first of `size` consecutive free ports (the ring backend uses one per rank)."""
    for _ in range(50):
        first = free_port()
        if first + size < 65000 and all(_free(first + i) for i in range(size)):
            return first
    raise RuntimeError("no block of free ports")


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def processes_with(text: str) -> list[str]:
    """Command lines of live (non-zombie) processes that contain `text`."""
    out = subprocess.run(
        ["ps", "-A", "-ww", "-o", "stat=,pid=,command="], capture_output=True, text=True
    ).stdout
    rows = [line.split(None, 2) for line in out.splitlines()]
    return [f"{r[1]} {r[2]}" for r in rows if len(r) == 3 and text in r[2] and r[0][0] != "Z"]


def kill(pid: int) -> None:
    """SIGKILL `pid` (one rank: the crash the group must not survive)."""
    os.kill(pid, signal.SIGKILL)


def readme_group_table() -> str:
    """The manual's [distributed] example, verbatim: the first ```toml block of
    docs/distributed.md (so the tests fail when the docs drift from what works)."""
    section = (REPO_ROOT / "docs" / "distributed.md").read_text("utf-8")
    start = section.index("```toml\n") + len("```toml\n")
    table = section[start : section.index("```", start)]
    assert table.startswith("[distributed]\nhosts = ["), table
    return table


def readme_group_config(root: Path, env: dict[str, str], edits: dict[str, str], hosts: str) -> str:
    """What a new user does: `mlx-local config init`, their own values of some keys
    (`edits`: key -> TOML value, replacing that key's line of the file), then the README's
    table appended with this box's `hosts` and a free starting port. Returns the file."""
    created = run_cli(["config", "init"], root, env=env)
    assert created.returncode == 0, created.stderr
    path = root / "config.toml"
    text = path.read_text("utf-8")
    for key, value in edits.items():
        text, count = re.subn(rf"^{key} = .*$", f"{key} = {value}", text, count=1, flags=re.M)
        assert count == 1, f"config init wrote no {key} line"
    table = readme_group_table()
    table, count = re.subn(r"^hosts = \[[^]]*\]", f"hosts = {hosts}", table, flags=re.M)
    assert count == 1, table
    port = f"starting_port = {free_port_block()}"
    table, count = re.subn(r"^# starting_port = \d+", port, table, flags=re.M)
    assert count == 1, table
    path.write_text(text + table, "utf-8")
    return path.read_text("utf-8")


def upstream_checkout(root: Path, upstream_repo: Path) -> None:
    """root/mlx-lm-repo/mlx_lm/server.py of the pinned upstream release itself (from the
    stand-in upstream, no patches): a server that does not keep the disk prompt cache per
    rank."""
    pin = (REPO_ROOT / "patches" / "upstream.toml").read_text().split('pin = "')[1].split('"')[0]
    source = subprocess.run(
        ["git", "-C", str(upstream_repo), "show", f"{pin}:mlx_lm/server.py"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    checkout = root / "mlx-lm-repo"
    if checkout.is_symlink():
        checkout.unlink()
    (checkout / "mlx_lm").mkdir(parents=True)
    (checkout / "mlx_lm" / "server.py").write_text(source)


# What each rank of a group logs about its disk tier (patch 0005): "... on rank R of N".
SAVED = re.compile(r"Prompt cache disk: saved (\d+) tokens .* on rank (\d+) of (\d+)$", re.M)
LOADED = re.compile(r"Prompt cache disk: loaded (\d+) tokens .* on rank (\d+) of (\d+)\)$", re.M)


def disk_log(root: Path, pattern: re.Pattern[str]) -> list[tuple[int, int, int]]:
    """(tokens, rank, size) of each SAVED or LOADED line of the project's server log."""
    log = root / "logs" / "server.log"
    text = log.read_text("utf-8") if log.is_file() else ""
    return [tuple(int(g) for g in match) for match in pattern.findall(text)]


def wait_for(condition, timeout: float = 60) -> bool:
    """Poll `condition` until it is true or `timeout` seconds have passed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return condition()

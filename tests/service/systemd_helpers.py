"""A private systemd user manager for the systemd tests: the real `systemd --user`, in a mount
namespace of its own (a tmpfs on /run/systemd with system/ in it, so that it believes the
machine was booted with systemd), with its own XDG_RUNTIME_DIR and XDG_CONFIG_HOME. The
`systemctl --user` of mlx-local reaches it through $XDG_RUNTIME_DIR/systemd/private.
A logout stops the manager (and every unit); a login starts a new one, which starts the
units default.target wants, as a real login does. Needs root and unshare(1); else None."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

SYSTEMD = Path("/usr/lib/systemd/systemd")
UNIT = "mlx-local.service"
NAMESPACE_SCRIPT = (
    "mount -t tmpfs tmpfs /run/systemd && mkdir /run/systemd/system && exec {systemd} --user"
)


@dataclass
class UserManager:
    """One user's systemd instance."""

    runtime_dir: Path
    config_home: Path
    env: dict[str, str]
    process: subprocess.Popen | None = field(default=None, repr=False)
    kind = "systemd"

    def login(self, timeout: float = 30) -> bool:
        """Start the manager; False when it cannot run here."""
        self.process = subprocess.Popen(
            ["unshare", "-m", "--propagation", "shared", "sh", "-c"]
            + [NAMESPACE_SCRIPT.format(systemd=SYSTEMD)],
            env={**os.environ, **self.env},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            if self.systemctl("show-environment").returncode == 0:
                return True
            time.sleep(0.2)
        self.logout()
        return False

    def logout(self, timeout: float = 90) -> None:
        """Stop the manager: it stops every unit first (SIGTERM, then SIGKILL)."""
        if self.process is None or self.process.poll() is not None:
            return
        self.systemctl("exit")
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def systemctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["systemctl", "--user", *args],
            capture_output=True,
            text=True,
            env={**os.environ, **self.env},
            timeout=120,
        )

    def show(self, *properties: str) -> dict[str, str]:
        result = self.systemctl("show", UNIT, "-p", ",".join(properties))
        return dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)

    @property
    def service_file(self) -> Path:
        return self.config_home / "systemd" / "user" / UNIT

    @property
    def key_file(self) -> Path:
        """The credential file LoadCredential= reads (mode 0600, outside the project)."""
        return self.config_home / "credstore" / "mlx-local-api-key"

    def pid(self) -> int | None:
        """The unit's main pid, if it runs."""
        value = self.show("MainPID").get("MainPID", "0")
        return int(value) if value.isdigit() and value != "0" else None

    def instance(self) -> str:
        """Which run of the unit is current: when systemd started it, and the pid."""
        data = self.show("ExecMainStartTimestampMonotonic", "MainPID")
        return f"{data.get('ExecMainStartTimestampMonotonic')}/{data.get('MainPID')}"

    def loaded(self) -> bool:
        """Whether the unit runs or is about to (systemd's counterpart of a loaded job)."""
        return self.show("ActiveState").get("ActiveState") in ("active", "activating")

    def enabled(self) -> bool:
        return self.systemctl("is-enabled", UNIT).stdout.strip() == "enabled"

    def stop_seconds(self) -> int:
        """TimeoutStopSec of the loaded unit."""
        return int(self.show("TimeoutStopUSec")["TimeoutStopUSec"].removesuffix("s"))

    def exited_cleanly(self) -> bool:
        """Whether systemd judged the last run's end a success: the unit is dead, not waiting
        to be restarted (Restart=on-failure). It forgets the exit status itself once it
        unloads the inactive unit."""
        return self.show("SubState").get("SubState") == "dead"

    def settled(self) -> bool:
        """Whether the unit is between runs: ended for good, or waiting to be restarted."""
        return self.show("SubState").get("SubState") in ("dead", "failed", "auto-restart")

    def restart_after_failure(self) -> None:
        """systemd restarts it after RestartSec (5 s) by itself: nothing to do."""


def can_run() -> str | None:
    """Why a private user manager cannot run here (None: it can)."""
    if os.geteuid() != 0:
        return "a private systemd user manager needs root here (unshare -m)"
    for tool in ("unshare", "systemctl"):
        if shutil.which(tool) is None:
            return f"{tool} is missing"
    if not SYSTEMD.is_file() or not Path("/run/systemd").is_dir():
        return "systemd is not installed"
    return None


@contextmanager
def user_manager(base: Path) -> Iterator[UserManager | None]:
    """A logged-in private user manager (None when it cannot start); logged out at the end."""
    runtime_dir = Path(tempfile.mkdtemp(prefix="xdg-", dir="/tmp"))  # short: socket paths
    runtime_dir.chmod(0o700)
    config_home = base / "xdg-config"
    config_home.mkdir(parents=True)
    env = {"XDG_RUNTIME_DIR": str(runtime_dir), "XDG_CONFIG_HOME": str(config_home)}
    manager = UserManager(runtime_dir, config_home, env)
    try:
        yield manager if manager.login() else None
    finally:
        manager.logout()
        shutil.rmtree(runtime_dir, ignore_errors=True)

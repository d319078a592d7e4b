"""A session of the stand-in launchd (tests/standin/launchd.py) for the launchd tests on Linux:
a home folder with ~/Library/LaunchAgents, the stand-in `launchctl` and `security` first on
PATH, and login / logout (a logout stops every job; a login bootstraps the agents that are not
disabled, as macOS does)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tests.helpers import REPO_ROOT

STANDIN = REPO_ROOT / "tests" / "standin"
LABEL = "com.local.mlx-local"
CLEANUP_SECONDS = 2.0  # the stand-in's cleanup window after bootout (5 s on macOS)


@dataclass
class StandInLaunchd:
    """One user's GUI session under the stand-in launchd."""

    state_dir: Path
    home: Path
    env: dict[str, str]
    process: subprocess.Popen | None = field(default=None, repr=False)
    kind = "launchd"

    @property
    def agents_dir(self) -> Path:
        return self.home / "Library" / "LaunchAgents"

    @property
    def domain(self) -> str:
        return f"gui/{os.getuid()}"

    @property
    def target(self) -> str:
        return f"{self.domain}/{LABEL}"

    def login(self) -> bool:
        """Start the stand-in launchd; it bootstraps every agent that is not disabled."""
        self.process = subprocess.Popen(
            [sys.executable, str(STANDIN / "launchd.py"), "--dir", str(self.state_dir)]
            + ["--login-agents", str(self.agents_dir)],
            env={**os.environ, **self.env},
            start_new_session=True,
        )
        deadline = time.monotonic() + 30
        while not (self.state_dir / "launchd.sock").exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the stand-in launchd did not start")
            time.sleep(0.05)
        return True

    def logout(self, timeout: float = 90) -> None:
        """End the session: the stand-in launchd stops every job, then exits."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def launchctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["launchctl", *args],
            capture_output=True,
            text=True,
            env={**os.environ, **self.env},
            timeout=60,
        )

    def job(self) -> dict[str, str] | None:
        """`launchctl print` of mlx-local's job as key -> value; None when it is unknown."""
        result = self.launchctl("print", self.target)
        if result.returncode == 113:
            return None
        assert result.returncode == 0, result.stderr
        pairs = re.findall(r"^\s*([a-z][a-z ]*?) = (.*)$", result.stdout, flags=re.MULTILINE)
        return dict(pairs)

    @property
    def service_file(self) -> Path:
        return self.agents_dir / f"{LABEL}.plist"

    @property
    def key_file(self) -> Path:
        """Where the stand-in `security` keeps the login keychain's items."""
        return self.home / "Library" / "Keychains" / "login.keychain-standin.json"

    def pid(self) -> int | None:
        """The pid launchd runs the server as, if it runs."""
        job = self.job()
        return int(job["pid"]) if job and "pid" in job else None

    def instance(self) -> str:
        """Which run of the job is current: launchd's run count and the pid."""
        job = self.job() or {}
        return f"{job.get('runs')}/{job.get('pid')}"

    def loaded(self) -> bool:
        return self.job() is not None

    def enabled(self) -> bool:
        disabled = self.launchctl("print-disabled", self.domain).stdout
        return f'"{LABEL}" => disabled' not in disabled

    def stop_seconds(self) -> int:
        """The exit timeout launchd has for the loaded job."""
        job = self.job()
        assert job is not None
        return int(job["exit timeout"])

    def exited_cleanly(self) -> bool:
        """Whether launchd recorded the last run's end as exit status 0."""
        job = self.job() or {}
        return "last terminating signal" not in job and job.get("last exit code") == "0"

    def settled(self) -> bool:
        """Whether the job is between runs: not running, or waiting out its throttle."""
        job = self.job()
        return job is not None and job["state"] in ("not running", "spawn scheduled")

    def restart_after_failure(self) -> None:
        """launchd waits out ThrottleInterval (30 s) before a respawn: kickstart it now."""
        job = self.job()
        assert job is not None and job["state"] == "spawn scheduled", job
        kicked = self.launchctl("kickstart", self.target)
        assert kicked.returncode == 0, kicked.stderr

    def log(self) -> str:
        """The stand-in launchd's own log (what launchd writes to the unified log)."""
        path = self.state_dir / "launchd.log"
        return path.read_text() if path.exists() else ""


@contextmanager
def standin_launchd(base: Path) -> Iterator[StandInLaunchd]:
    """A logged-in session of the stand-in launchd; logged out (every job stopped) at the end."""
    state_dir = Path(tempfile.mkdtemp(prefix="launchd-", dir="/tmp"))  # short: a socket path
    home = base / "home"
    home.mkdir(parents=True)
    env = {
        "PATH": f"{STANDIN / 'bin'}:{os.environ['PATH']}",
        "HOME": str(home),
        "STANDIN_LAUNCHD_DIR": str(state_dir),
        "STANDIN_LAUNCHD_CLEANUP_SECONDS": str(CLEANUP_SECONDS),
        "STANDIN_PYTHON": sys.executable,
        "MLX_LOCAL_SERVICE_MANAGER": "launchd",
        "MLX_LOCAL_SECURITY": str(STANDIN / "bin" / "security"),
    }
    session = StandInLaunchd(state_dir, home, env)
    session.login()
    try:
        yield session
    finally:
        session.logout()
        shutil.rmtree(state_dir, ignore_errors=True)

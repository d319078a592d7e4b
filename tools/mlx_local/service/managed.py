"""What launchd or systemd says about the service, in one shape for both."""

from __future__ import annotations

import signal
from dataclasses import dataclass


@dataclass(frozen=True)
class ServiceState:
    """The service as its manager sees it (None stands for "not loaded")."""

    pid: int | None  # the running server's pid
    runs: int  # processes started since the service was loaded or last started
    last_exit: int | None  # exit status of the last run, -N for a death by signal N
    restarting: bool  # it failed and its manager will start it again (a crash loop)


def describe_exit(status: int) -> str:
    """`exited 0`, `exited 1`, `killed by SIGABRT`."""
    if status >= 0:
        return f"exited {status}"
    try:
        return f"killed by {signal.Signals(-status).name}"
    except ValueError:
        return f"killed by signal {-status}"

"""Which service manager runs the login service: launchd on macOS, systemd elsewhere."""

from __future__ import annotations

import os
import sys
from typing import Literal

MANAGER_ENV = "MLX_LOCAL_SERVICE_MANAGER"
Kind = Literal["launchd", "systemd"]
KINDS: tuple[Kind, ...] = ("launchd", "systemd")


def native_kind() -> Kind:
    """launchd on macOS, systemd elsewhere; $MLX_LOCAL_SERVICE_MANAGER names one instead (the
    tests drive the stand-in launchctl on Linux with it)."""
    chosen = os.environ.get(MANAGER_ENV)
    if chosen in KINDS:
        return chosen  # type: ignore[return-value]
    return "launchd" if sys.platform == "darwin" else "systemd"

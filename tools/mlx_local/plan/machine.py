"""This machine's memory: physical RAM and, on macOS, the GPU's wired-memory limit.

mlx-lm wires up to Metal's `recommendedMaxWorkingSetSize` (mlx's `device_info()`
"max_recommended_working_set_size"): `iogpu.wired_limit_mb` when that sysctl is set (non-zero),
else macOS's own default share of RAM, about 2/3 of it up to 36 GiB and 3/4 above.
`MLX_LOCAL_MEMORY_BYTES` stands in for the physical memory (to plan for another machine).
"""

from __future__ import annotations

import os
import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError

MEMORY_ENV = "MLX_LOCAL_MEMORY_BYTES"
SYSCTL_WIRED = "iogpu.wired_limit_mb"
GiB = 1 << 30
MiB = 1 << 20
OS_RESERVE = 4 * GiB  # what a raised wired limit leaves to macOS itself


@dataclass(frozen=True)
class Machine:
    """Memory this machine offers a model."""

    system: str  # platform.system(): Darwin, Linux, ...
    physical_bytes: int
    physical_source: str  # where physical_bytes came from
    gpu_limit_bytes: int | None  # macOS: the wired limit mlx-lm works within
    gpu_limit_source: str | None

    @property
    def budget_bytes(self) -> int:
        """What a model, its KV cache and the prompt cache must fit in."""
        return self.gpu_limit_bytes or self.physical_bytes

    @property
    def budget_name(self) -> str:
        return "GPU wired limit" if self.gpu_limit_bytes else "physical memory"


def meminfo_total(text: str) -> int:
    """MemTotal of /proc/meminfo's text, in bytes."""
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name == "MemTotal":
            number, _, unit = value.strip().partition(" ")
            return int(number) * (1024 if unit.strip().lower() == "kb" else 1)
    raise ValueError("no MemTotal line")


def default_wired_limit(physical: int) -> int:
    """macOS's default GPU working set when iogpu.wired_limit_mb is 0 (approximate)."""
    return physical * 2 // 3 if physical <= 36 * GiB else physical * 3 // 4


def _sysctl(name: str) -> int | None:
    try:
        result = subprocess.run(
            ["sysctl", "-n", name], capture_output=True, text=True, timeout=10, check=True
        )
        return int(result.stdout.strip())
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


def _override() -> int | None:
    value = os.environ.get(MEMORY_ENV)
    if value is None:
        return None
    try:
        parsed = int(value)
    except ValueError:
        parsed = 0
    if parsed <= 0:
        raise UserError(f"{MEMORY_ENV}={value!r} is not allowed; allowed: a byte count > 0")
    return parsed


def physical_memory(system: str | None = None) -> tuple[int, str]:
    """Physical memory in bytes, and where the number came from."""
    override = _override()
    if override is not None:
        return override, f"${MEMORY_ENV}"
    system = system or platform.system()
    if system == "Darwin":
        value = _sysctl("hw.memsize")
        if value:
            return value, "sysctl hw.memsize"
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        return meminfo_total(meminfo.read_text()), "/proc/meminfo"
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "sysconf"


def read() -> Machine:
    """This machine's memory."""
    system = platform.system()
    physical, source = physical_memory(system)
    limit = limit_source = None
    if system == "Darwin":
        wired_mb = _sysctl(SYSCTL_WIRED)
        if wired_mb:
            limit, limit_source = wired_mb * MiB, f"sysctl {SYSCTL_WIRED}"
        else:
            limit, limit_source = default_wired_limit(physical), "macOS default (about)"
    return Machine(system, physical, source, limit, limit_source)


def sysctl_line(machine: Machine, needed_bytes: int) -> str | None:
    """The command that raises the GPU wired limit to hold `needed_bytes`, when that helps:
    on macOS, when the need exceeds the limit but still leaves macOS OS_RESERVE of RAM."""
    if machine.gpu_limit_bytes is None or needed_bytes <= machine.gpu_limit_bytes:
        return None
    megabytes = -(-needed_bytes // (1024 * MiB)) * 1024  # whole GiB, in MB
    if megabytes * MiB > machine.physical_bytes - OS_RESERVE:
        return None
    return f"sudo sysctl {SYSCTL_WIRED}={megabytes}"

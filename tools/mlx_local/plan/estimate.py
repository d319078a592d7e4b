"""The memory plan: weights + the active KV cache + the prompt cache's worst case, against
this machine, at each context length and KV precision; and the one-line verdict for a config.

The server keeps up to `prompt_cache_size` caches in its LRU prompt cache (each as large as its
conversation) and works on a deep copy of one of them, so at a full context the worst case is
the weights plus (1 + prompt_cache_size) whole caches, the stored ones capped by
`prompt_cache_bytes` when set.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from . import kv
from .machine import GiB, Machine, sysctl_line
from .model_shape import ModelShape

if TYPE_CHECKING:
    from ..config import Config

DEFAULT_PROMPT_CACHE_SIZE = 10  # the server's --prompt-cache-size default
TIGHT = 0.9  # above this share of the budget a plan is "tight"
SEARCH_LIMIT = 1 << 24  # tokens: the largest context searched for


@dataclass(frozen=True)
class Settings:
    """The server settings that decide memory."""

    kv_bits: int | None = None
    kv_group_size: int = kv.DEFAULT_GROUP_SIZE
    quantized_kv_start: int = kv.DEFAULT_QUANTIZED_KV_START
    prompt_cache_size: int = DEFAULT_PROMPT_CACHE_SIZE
    prompt_cache_bytes: int | None = None
    hosts: int = 1  # a [distributed] group: weights and caches are split this many ways

    @classmethod
    def from_config(cls, config: Config) -> Settings:
        """Settings of a config: its server options, and its group's size if it has one."""
        hosts = config.distributed.size if config.distributed is not None else 1
        return replace(cls.from_options(config.options), hosts=hosts)

    @classmethod
    def from_options(cls, options: dict) -> Settings:
        """Settings from a config's server options (absent keys: the server's defaults)."""
        return cls(
            kv_bits=options.get("kv_bits"),
            kv_group_size=options.get("kv_group_size", kv.DEFAULT_GROUP_SIZE),
            quantized_kv_start=options.get("quantized_kv_start", kv.DEFAULT_QUANTIZED_KV_START),
            prompt_cache_size=options.get("prompt_cache_size", DEFAULT_PROMPT_CACHE_SIZE),
            prompt_cache_bytes=options.get("prompt_cache_bytes"),
        )


@dataclass(frozen=True)
class Need:
    """Memory needed at one context length and KV precision."""

    context: int
    kv_bits: int | None
    weights_bytes: int
    kv_bytes: int  # the conversation being served
    prompt_cache_bytes: int  # the prompt cache's kept entries, worst case
    total_bytes: int


def need(shape: ModelShape, settings: Settings, context: int, bits: int | None) -> Need:
    """What the model needs at `context` tokens with KV precision `bits` (None: full), on each
    host of a group: tensor and pipeline modes both split weights and KV caches evenly."""
    one = kv.cache_bytes(shape, context, bits, settings.kv_group_size, settings.quantized_kv_start)
    kept = settings.prompt_cache_size * one
    if settings.prompt_cache_bytes is not None:
        kept = min(kept, settings.prompt_cache_bytes)
    share = settings.hosts
    weights, one, kept = (-(-amount // share) for amount in (shape.weights_bytes, one, kept))
    return Need(context, bits, weights, one, kept, weights + one + kept)


def largest_context(shape: ModelShape, settings: Settings, bits: int | None, budget: int) -> int:
    """The largest context whose need fits `budget` (0 if not even an empty one does)."""
    at_start = replace(settings, quantized_kv_start=0)
    fits = lambda n: need(shape, at_start, n, bits).total_bytes <= budget  # noqa: E731
    if not fits(0):
        return 0
    low, high = 0, SEARCH_LIMIT
    if fits(high):
        return high
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


@dataclass
class Verdict:
    """The plan's one-line answer for a configuration."""

    level: str  # fits, tight, does not fit; unknown when the model cannot be read
    line: str
    changes: list[str] = field(default_factory=list)


def gib(n: float) -> str:
    """Bytes as GiB with one decimal (MiB with two below 1 GiB)."""
    return f"{n / GiB:.1f} GiB" if n >= GiB else f"{n / (1 << 20):.2f} MiB"


def byte_text(n: int) -> str:
    """A byte count rounded down to a config value: "12G", "512M", "300K"."""
    for unit, size in (("G", GiB), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= size:
            return f"{n // size}{unit}"
    return str(n)


def _changes(
    shape: ModelShape, settings: Settings, machine: Machine, context: int, n: Need
) -> list[str]:
    """What would make the plan fit, best first."""
    budget = machine.budget_bytes
    changes = []
    room = budget - n.weights_bytes - n.kv_bytes
    if n.prompt_cache_bytes and room > 0:
        entries = room // n.kv_bytes if n.kv_bytes else 0
        if entries >= 1:
            changes.append(f"prompt_cache_size = {entries}")
        changes.append(f'prompt_cache_bytes = "{byte_text(room)}"')
    if settings.kv_bits is None and kv.kv_bits_problem(shape, settings.kv_group_size) is None:
        for bits in (8, 4):
            if need(shape, settings, context, bits).total_bytes <= budget:
                changes.append(f"kv_bits = {bits}")
                break
    line = sysctl_line(machine, n.total_bytes)
    if line:
        changes.append(line)
    longest = largest_context(shape, settings, settings.kv_bits, budget)
    if 0 < longest < context:
        changes.append(f"keep contexts under {longest:,} tokens")
    return changes or ["a smaller model, or a machine with more memory"]


def verdict(
    shape: ModelShape, settings: Settings, machine: Machine, context: int | None = None
) -> Verdict:
    """fits / tight / does not fit, at `context` tokens (default: the model's maximum)."""
    context = context or shape.max_context or 32768
    n = need(shape, settings, context, settings.kv_bits)
    budget = machine.budget_bytes
    where = f"{gib(budget)} {machine.budget_name}"
    each = f"each of {settings.hosts} hosts: " if settings.hosts > 1 else ""
    parts = each + (
        f"weights {gib(n.weights_bytes)} + KV {gib(n.kv_bytes)} at {context:,} tokens + "
        f"prompt cache {gib(n.prompt_cache_bytes)} = {gib(n.total_bytes)} of {where}"
    )
    if n.total_bytes <= TIGHT * budget:
        return Verdict("fits", f"plan: fits: {parts}")
    if n.total_bytes <= budget:
        return Verdict("tight", f"plan: tight: {parts}")
    changes = _changes(shape, settings, machine, context, n)
    fix = ", or ".join(changes)
    return Verdict("does not fit", f"plan: does not fit: {parts}; to fit: {fix}", changes)

"""What a benchmark run measures and how often: full sizes, or tiny ones for --quick."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Settings:
    """What to measure and how often."""

    model: Path
    out_dir: Path
    repeats: int
    quick: bool
    prefixes: list[int]
    decode_tokens: int
    first_turn_tokens: int
    interleave_prefix: int
    kv_contexts: list[int]
    kv_server_prefix: int
    restart_prefix: int


def settings(model: Path, out_dir: Path, quick: bool, repeats: int | None) -> Settings:
    """Full runs use 2K/4K/8K prefixes; --quick uses tiny ones (a plumbing check)."""
    if quick:
        return Settings(
            model=model,
            out_dir=out_dir,
            repeats=repeats or 1,
            quick=True,
            prefixes=[64, 128],
            decode_tokens=4,
            first_turn_tokens=2,
            interleave_prefix=64,
            kv_contexts=[64, 256, 512],
            kv_server_prefix=128,
            restart_prefix=64,
        )
    return Settings(
        model=model,
        out_dir=out_dir,
        repeats=repeats or 3,
        quick=False,
        prefixes=[2048, 4096, 8192],
        decode_tokens=32,
        first_turn_tokens=8,
        interleave_prefix=2048,
        kv_contexts=[1024, 2048, 4096, 8192],
        kv_server_prefix=4096,
        restart_prefix=4096,
    )

"""A plain script inside the runtime python (never imported by the tools): time loading a
conversation's prefix from a whole-entry folder and from a block folder.

    python disk_blocks_runner.py WHOLE_DIR BLOCKS_DIR TOKENS LOADS

Whole entries: mlx-lm's load_prompt_cache of the largest file, trimmed to TOKENS (what the
old tier did). Blocks: the tier's own plan and read of the same tokens (index built once,
as a server does at start). Both evaluate every array. Then the same with a synthetic
cache of a wide shape (8 layers of 8 KV heads of 128 dimensions in float16, 32 KB a token:
where bytes, not files, dominate). Prints JSON."""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.models.cache import (
    KVCache,
    LRUPromptCache,
    load_prompt_cache,
    save_prompt_cache,
    trim_prompt_cache,
)
from mlx_lm.prompt_cache_disk import DiskPromptCache, TieredPromptCache


def _eval(cache):
    mx.eval([x for c in cache for _, x in tree_flatten(c.state) if isinstance(x, mx.array)])


def _median_seconds(load, loads: int) -> float:
    times = []
    for _ in range(loads):
        start = time.perf_counter()
        load()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def synthetic(tokens_wanted: int, loads: int, layers=8, heads=8, dims=128) -> dict:
    """Load times of a wide synthetic cache: one whole file against its blocks."""
    n = tokens_wanted + 200
    cache = []
    for _ in range(layers):
        c = KVCache()
        k = mx.random.normal((1, heads, n, dims)).astype(mx.float16)
        c.update_and_fetch(k, -k)
        cache.append(c)
    tokens = list(range(n))
    with tempfile.TemporaryDirectory(prefix="bench-disk-blocks-wide-") as tmp:
        entry = f"{tmp}/whole.safetensors"
        save_prompt_cache(entry, cache)
        args = argparse.Namespace(
            prompt_cache_dir=f"{tmp}/blocks", prompt_cache_dir_bytes=1 << 50, model="wide",
            adapter_path=None, draft_model=None, kv_bits=None, kv_group_size=64,
            quantized_kv_start=0,
        )  # fmt: skip
        tier = TieredPromptCache(LRUPromptCache(1), args)
        tier.insert_cache(("wide", None, None), tokens, cache)
        tier.close()
        disk = DiskPromptCache(args.prompt_cache_dir, 1 << 50, args)
        key = ("wide", None, None)
        disk.plan(key, tokens[: tokens_wanted + 1])

        def whole():
            c = load_prompt_cache(entry)
            trim_prompt_cache(c, c[0].offset - tokens_wanted)
            _eval(c)

        def blocks():
            c, _ = disk.read(disk.plan(key, tokens[: tokens_wanted + 1]))
            _eval(c)

        return {
            "bytes_per_token": layers * heads * dims * 2 * 2,
            "whole_seconds": _median_seconds(whole, loads),
            "blocks_seconds": _median_seconds(blocks, loads),
        }


def main() -> None:
    whole_dir, blocks_dir = Path(sys.argv[1]), Path(sys.argv[2])
    tokens_wanted, loads = int(sys.argv[3]), int(sys.argv[4])
    entry = max(whole_dir.glob("*/*.safetensors"), key=lambda p: p.stat().st_size)
    _, meta = load_prompt_cache(str(entry), return_metadata=True)
    tokens = json.loads(meta["tokens"])[: tokens_wanted + 1]

    whole = []
    for _ in range(loads):
        start = time.perf_counter()
        cache = load_prompt_cache(str(entry))
        trim_prompt_cache(cache, cache[0].offset - tokens_wanted)
        _eval(cache)
        whole.append(time.perf_counter() - start)

    (folder,) = [p for p in blocks_dir.iterdir() if (p / "identity.json").is_file()]
    identity = (folder / "identity.json").read_text().strip()
    disk = DiskPromptCache(str(blocks_dir), 1 << 50, None)
    disk._identity = lambda key: (folder.name, identity)  # the server's folder, as it is
    disk.plan("bench", tokens)  # index once, as a server does at its first request
    timed, files = [], 0
    for _ in range(loads):
        start = time.perf_counter()
        plan = disk.plan("bench", tokens)
        cache, n = disk.read(plan)
        _eval(cache)
        timed.append(time.perf_counter() - start)
        files = len(plan.files)
        assert n == tokens_wanted, (n, tokens_wanted)
    print(
        json.dumps(
            {
                "tokens": tokens_wanted,
                "files": files,
                "whole_seconds": statistics.median(whole),
                "blocks_seconds": statistics.median(timed),
                "wide": synthetic(tokens_wanted, loads),
            }
        )
    )


if __name__ == "__main__":
    main()

"""Measure the bytes mlx-lm's own caches report: run in the patched runtime's python.

    python plan_cache_bytes.py MODEL_DIR '{"contexts": [...], "bits": [null, 4, 8],
                                           "group_size": 32, "mode": "prefill"}'

For each KV precision and context it builds a new cache with `make_prompt_cache`, fills it as
`generate_step` prefills one prompt (chunks of 2048 tokens; `maybe_quantize_kv_cache` after each
chunk, quantizing from token 0), and prints {"<context>/<bits>": sum of the caches' nbytes}
as JSON.
Mode "prefill" runs the model's forward pass on random token ids; mode "fill" calls each
layer cache's `update_and_fetch` with random keys and values of the model's shape instead
(for contexts too long to prefill on a CPU).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import mlx.core as mx
from mlx_lm.generate import maybe_quantize_kv_cache
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.utils import load_model

CHUNK = 2048


def fill(model, cache, config: dict, tokens: int) -> Iterator[None]:
    """update_and_fetch with random keys/values shaped as the model's attention makes them."""
    config = config.get("text_config", config)
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    dtype = model.layers[0].self_attn.k_proj.weight.dtype
    for start in range(0, tokens, CHUNK):
        n = min(CHUNK, tokens - start)
        for layer_cache in cache:
            k = mx.random.normal((1, kv_heads, n, head_dim)).astype(dtype)
            v = mx.random.normal((1, kv_heads, n, head_dim)).astype(dtype)
            layer_cache.update_and_fetch(k, v)
        yield


def prefill(model, cache, vocab: int, tokens: int) -> Iterator[None]:
    """The model's forward pass over `tokens` random token ids as generate_step runs it: all
    but the last token in chunks, then the last one alone (the first generation step)."""
    ids = mx.random.randint(0, vocab, (1, tokens))
    for start in range(0, tokens - 1, CHUNK):
        model(ids[:, start : min(start + CHUNK, tokens - 1)], cache=cache)
        yield
    model(ids[:, tokens - 1 :], cache=cache)
    yield


def main() -> None:
    folder = Path(sys.argv[1])
    spec = json.loads(sys.argv[2])
    model, config = load_model(folder)
    mx.random.seed(0)
    results = {}
    for bits in spec["bits"]:
        for context in spec["contexts"]:
            cache = make_prompt_cache(model)
            if spec.get("mode", "prefill") == "prefill":
                vocab = config.get("text_config", config)["vocab_size"]
                steps = prefill(model, cache, vocab, context)
            else:
                steps = fill(model, cache, config, context)
            for _ in steps:
                maybe_quantize_kv_cache(cache, 0, spec["group_size"], bits)
                mx.eval([c.state for c in cache])
            results[f"{context}/{bits}"] = sum(c.nbytes for c in cache)
    print(json.dumps(results))


if __name__ == "__main__":
    main()

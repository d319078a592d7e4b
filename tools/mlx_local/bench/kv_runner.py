"""KV cache bytes and decode speed, measured in-process with mlx-lm's own cache objects.

Run as a script by the patched runtime's python (it imports only mlx and mlx_lm, never
mlx_local): `python kv_runner.py --model PATH --contexts 1024,8192 --bits 0,8,4`.
Prints one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.utils import load

PREFILL_CHUNK = 512


def state_bytes(cache: list) -> int:
    """Bytes of the arrays a prompt cache holds for its tokens (what it keeps and saves).
    Since mlx-lm 0.32 a cache's state also carries plain ints (offset, bits): skip them."""
    arrays = (a for c in cache for _, a in tree_flatten(c.state))
    return sum(a.nbytes for a in arrays if isinstance(a, mx.array))


def group_size_for(model, wanted: int) -> int:
    """`wanted`, or the largest smaller power of two that divides the model's head dim."""
    args = model.args
    head_dim = getattr(args, "head_dim", None) or args.hidden_size // args.num_attention_heads
    size = wanted
    while head_dim % size:
        size //= 2
    return size


def prefill(model, cache: list, tokens: mx.array) -> None:
    """Run `tokens` through the model in chunks, filling `cache`."""
    for start in range(0, tokens.shape[0], PREFILL_CHUNK):
        model(tokens[None, start : start + PREFILL_CHUNK], cache=cache)
        mx.eval([c.state for c in cache])


def decode_rate(model, cache: list, steps: int) -> float:
    """Greedy decode `steps` tokens on top of `cache`; tokens per second."""
    token = mx.array([[1]])
    start = time.perf_counter()
    for _ in range(steps):
        logits = model(token, cache=cache)
        token = mx.argmax(logits[:, -1, :], axis=-1, keepdims=True)
        mx.eval(token)
    return steps / (time.perf_counter() - start)


def measure(
    model_path: str, contexts: list[int], bits: list[int], group: int, steps: int, repeats: int
) -> dict:
    """Bytes at each context length, and decode tokens/s at the longest, per bit width.

    The prompt is prefilled once in full precision; each bit width is that cache quantized,
    as the server's `--quantized-kv-start` does. Decode speed is a median over `repeats`, the
    cache trimmed back to the prompt after each run."""
    model, _ = load(model_path)
    group = group_size_for(model, group)
    contexts = sorted(contexts)
    tokens = mx.random.randint(4, model.args.vocab_size, (contexts[-1],), key=mx.random.key(0))
    cache = make_prompt_cache(model)
    sizes: dict[int, dict[str, int]] = {width: {} for width in bits}
    done = 0
    for context in contexts:
        prefill(model, cache, tokens[done:context])
        done = context
        for width in bits:
            view = cache if width == 0 else [c.to_quantized(group, width) for c in cache]
            sizes[width][str(context)] = state_bytes(view)
    results = {}
    for width in bits:
        rates = []
        for _ in range(repeats):
            run = cache if width == 0 else [c.to_quantized(group, width) for c in cache]
            rates.append(decode_rate(model, run, steps))
            if width == 0:
                for c in cache:
                    c.trim(steps)
        label = "fp16" if width == 0 else f"{width}bit"
        results[label] = {
            "bits": width or None,
            "bytes": sizes[width],
            "decode_tps": statistics.median(rates),
        }
    return {
        "group_size": group,
        "decode_context": contexts[-1],
        "decode_tokens": steps,
        "configs": results,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--contexts", required=True, help="comma-separated token counts")
    parser.add_argument("--bits", default="0,8,4", help="0 is full precision")
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    result = measure(
        args.model,
        [int(c) for c in args.contexts.split(",")],
        [int(b) for b in args.bits.split(",")],
        args.group_size,
        args.decode_tokens,
        args.repeats,
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()

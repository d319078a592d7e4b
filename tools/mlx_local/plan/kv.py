"""KV-cache bytes as mlx-lm's caches count them (`nbytes` of mlx_lm/models/cache.py).

`KVCache` and `QuantizedKVCache` allocate in steps of 256 tokens; a quantized entry holds the
packed values (`bits` per element in uint32 words) plus a scale and a bias per `group_size`
elements in the activation dtype. `RotatingKVCache` stops growing at its window (while a long
prompt is prefilled it briefly holds window - 1 + one prefill chunk), and it cannot be
quantized. Linear-attention layers keep a state of fixed size.

A prompt prefilled at once holds its context rounded up to the step; a cache grown turn by
turn may hold up to 255 slots more (each growth keeps the used part and adds whole steps).
"""

from __future__ import annotations

from .model_shape import LayerCache, ModelShape

STEP = 256  # KVCache.step, QuantizedKVCache.step, RotatingKVCache.step
DEFAULT_GROUP_SIZE = 64  # the server's --kv-group-size default
DEFAULT_QUANTIZED_KV_START = 5000  # mlx_lm.generate.DEFAULT_QUANTIZED_KV_START


def allocated_tokens(tokens: int) -> int:
    """Token slots a KVCache holds after `tokens` tokens (rounded up to the step)."""
    return -(-tokens // STEP) * STEP


def token_bytes(shape: ModelShape, bits: int | None, group_size: int) -> float:
    """Bytes of keys plus values for one token in one attention layer."""
    elements = shape.kv_heads * shape.head_dim
    if bits is None:
        return 2 * elements * shape.kv_dtype_bytes
    packed = elements * bits / 8
    scales_biases = 2 * (elements // group_size) * shape.kv_dtype_bytes
    return 2 * (packed + scales_biases)


SLIDING_PROBLEM = (
    "mlx-lm cannot quantize this model's sliding-window caches (RotatingKVCache), so kv_bits "
    "fails on it; leave kv_bits off"
)


def kv_bits_problem(shape: ModelShape, group_size: int) -> str | None:
    """Why kv_bits with `group_size` cannot work on this model, or None when it can."""
    if any(layer.kind == "sliding" for layer in shape.layers):
        return SLIDING_PROBLEM
    return group_size_problem(shape, group_size)


def group_size_problem(shape: ModelShape, group_size: int) -> str | None:
    """Why `group_size` cannot quantize this model's KV cache, or None when it can."""
    if shape.head_dim % group_size:
        return (
            f"kv_group_size {group_size} does not divide the head size {shape.head_dim}; "
            f"use a group size that does (e.g. {_divisor(shape.head_dim)})"
        )
    return None


def _divisor(head_dim: int) -> int:
    return next((g for g in (128, 64, 32) if head_dim % g == 0), 32)


def layer_bytes(
    shape: ModelShape, layer: LayerCache, tokens: int, bits: int | None, group_size: int
) -> int:
    """Bytes one layer's cache reports after `tokens` tokens."""
    if layer.kind == "linear":
        return layer.state_bytes if tokens else 0
    if layer.kind == "sliding":
        slots = min(allocated_tokens(tokens), layer.window or tokens)
        return int(slots * token_bytes(shape, None, group_size))
    return int(allocated_tokens(tokens) * token_bytes(shape, bits, group_size))


def cache_bytes(
    shape: ModelShape,
    tokens: int,
    bits: int | None = None,
    group_size: int = DEFAULT_GROUP_SIZE,
    quantized_kv_start: int = 0,
) -> int:
    """Bytes of one conversation's whole cache at `tokens` tokens of context. With `bits`, the
    cache is quantized once the context reaches `quantized_kv_start` (as the server does)."""
    if bits is not None and tokens < quantized_kv_start:
        bits = None
    return sum(layer_bytes(shape, layer, tokens, bits, group_size) for layer in shape.layers)


def bytes_per_token(shape: ModelShape, bits: int | None, group_size: int) -> float:
    """Bytes each further token of context adds, over all layers that keep growing."""
    growing = sum(1 for layer in shape.layers if layer.kind == "full")
    return growing * token_bytes(shape, bits, group_size)

"""A model's memory shape from config.json and the safetensors headers, without loading it.

The per-layer cache kinds mirror the `make_cache` of mlx-lm's model families: a growing
`KVCache` for full attention, a `RotatingKVCache(max_size=sliding_window)` for sliding-window
layers, and an `ArraysCache` of fixed size for linear-attention (gated delta) layers.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..errors import UserError

DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "U32": 4, "I16": 2}
FLOAT_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
CONFIG_DTYPES = {"float32": 4, "float16": 2, "bfloat16": 2}
MAX_HEADER = 100_000_000

LayerKind = Literal["full", "sliding", "linear"]
# Model types whose mlx-lm `make_cache` gives sliding-window layers a RotatingKVCache (v0.32.2);
# other families keep a full KVCache on every attention layer, whatever their config says.
SLIDING_TYPES = frozenset(
    [
        "afmoe",
        "baichuan_m1",
        "cohere2",
        "exaone4",
        "exaone_moe",
        "gear",
        "gemma3",
        "gemma3_text",
        "gemma3n",
        "gemma4",
        "gemma4_text",
        "gpt_oss",
        "iquestloopcoder",
        "laguna",
        "llama",
        "mellum",
        "mimo_v2_flash",
        "ministral3",
        "muse_glimmer",
        "muse_spark",
        "olmo3",
        "plamo3",
        "recurrent_gemma",
        "spark2_5",
        "step3p5",
    ]
)


@dataclass(frozen=True)
class LayerCache:
    """What one layer keeps per conversation: a growing KV cache, a window, or a fixed state."""

    kind: LayerKind
    window: int | None = None  # sliding: the RotatingKVCache's max_size
    state_bytes: int = 0  # linear: the ArraysCache's bytes, whatever the context


@dataclass(frozen=True)
class ModelShape:
    """The numbers the memory plan needs about one model folder."""

    path: Path
    model_type: str
    weights_bytes: int
    quantization: str  # "4-bit, group 64", "float16", ...
    kv_heads: int
    head_dim: int
    kv_dtype: str  # the activations' dtype, which the KV cache stores
    kv_dtype_bytes: int
    max_context: int | None
    layers: tuple[LayerCache, ...]

    @property
    def attention_layers(self) -> int:
        return sum(1 for layer in self.layers if layer.kind != "linear")


def read_safetensors_header(file: Path) -> dict:
    """The JSON header of a safetensors file (8-byte little-endian length, then JSON)."""
    try:
        with open(file, "rb") as handle:
            raw = handle.read(8)
            if len(raw) < 8:
                raise UserError(f"{file} is not a safetensors file (truncated)")
            (length,) = struct.unpack("<Q", raw)
            if length > MAX_HEADER:
                raise UserError(f"{file} is not a safetensors file (header of {length} bytes)")
            header = json.loads(handle.read(length))
    except (OSError, ValueError) as error:
        raise UserError(f"cannot read the safetensors header of {file}: {error}") from None
    header.pop("__metadata__", None)
    return header


def _text_config(config: dict) -> dict:
    """The language model's settings (vision-language models nest them in text_config)."""
    text = config.get("text_config")
    return {**config, **text} if isinstance(text, dict) else config


def _layer_caches(cfg: dict, num_layers: int, dtype_bytes: int) -> tuple[LayerCache, ...]:
    window = cfg.get("sliding_window")
    layer_types = cfg.get("layer_types")
    if isinstance(layer_types, list) and len(layer_types) == num_layers:
        kinds = [
            "linear" if "linear" in t else "sliding" if "sliding" in t and window else "full"
            for t in layer_types
        ]
    elif cfg.get("sliding_window_pattern") and window:
        pattern = int(cfg["sliding_window_pattern"])
        kinds = ["full" if i % pattern == pattern - 1 else "sliding" for i in range(num_layers)]
    elif cfg.get("full_attention_interval") and cfg.get("linear_num_value_heads"):
        interval = int(cfg["full_attention_interval"])
        kinds = ["full" if (i + 1) % interval == 0 else "linear" for i in range(num_layers)]
    else:
        kinds = ["full"] * num_layers
    if cfg.get("model_type") not in SLIDING_TYPES:
        kinds = ["full" if kind == "sliding" else kind for kind in kinds]
    state = _linear_state_bytes(cfg, dtype_bytes) if "linear" in kinds else 0
    return tuple(
        LayerCache(kind, window if kind == "sliding" else None, state if kind == "linear" else 0)
        for kind in kinds
    )


def _linear_state_bytes(cfg: dict, dtype_bytes: int) -> int:
    """A gated-delta layer's ArraysCache (Qwen3-Next, Qwen3.5): the convolution's last
    kernel-1 inputs in the activation dtype, and a float32 state of heads x Dv x Dk."""
    needed = ("linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim")
    if not all(cfg.get(k) for k in needed):
        raise UserError(
            f"model_type {cfg.get('model_type')!r} has linear-attention layers this plan does "
            "not know how to size"
        )
    k_dim = cfg["linear_num_key_heads"] * cfg["linear_key_head_dim"]
    v_head = cfg.get("linear_value_head_dim", cfg["linear_key_head_dim"])
    v_dim = cfg["linear_num_value_heads"] * v_head
    conv = (cfg.get("linear_conv_kernel_dim", 4) - 1) * (2 * k_dim + v_dim)
    ssm = cfg["linear_num_value_heads"] * v_head * cfg["linear_key_head_dim"] * 4
    return conv * dtype_bytes + ssm


def _weights(folder: Path) -> tuple[int, dict[str, int]]:
    """Bytes of tensor data in every *.safetensors file, and bytes per dtype."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UserError(f"{folder} has no .safetensors weights")
    by_dtype: dict[str, int] = {}
    for file in files:
        for info in read_safetensors_header(file).values():
            begin, end = info["data_offsets"]
            by_dtype[info["dtype"]] = by_dtype.get(info["dtype"], 0) + end - begin
    return sum(by_dtype.values()), by_dtype


def _quantization(config: dict, by_dtype: dict[str, int]) -> str:
    quant = config.get("quantization") or config.get("quantization_config")
    if isinstance(quant, dict) and quant.get("bits"):
        group = quant.get("group_size")
        return f"{quant['bits']}-bit" + (f", group {group}" if group else "")
    floats = {k: v for k, v in by_dtype.items() if k in FLOAT_NAMES}
    return FLOAT_NAMES[max(floats, key=floats.__getitem__)] if floats else "unknown"


def _kv_dtype(cfg: dict, by_dtype: dict[str, int]) -> str:
    """The activations' float dtype: the float dtype holding most weight bytes (unquantized
    tensors, or a quantized model's scales and biases), else config.json's torch_dtype."""
    floats = {k: v for k, v in by_dtype.items() if k in FLOAT_NAMES}
    if floats:
        return FLOAT_NAMES[max(floats, key=floats.__getitem__)]
    named = str(cfg.get("torch_dtype", cfg.get("dtype", "float16")))
    return named if named in CONFIG_DTYPES else "float16"


def read_shape(folder: Path) -> ModelShape:
    """The memory shape of the model in `folder` (a Hugging Face or MLX model folder)."""
    config_file = folder / "config.json"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise UserError(f"cannot read {config_file}: {error}") from None
    cfg = _text_config(config)
    try:
        num_layers = int(cfg["num_hidden_layers"])
        heads = int(cfg["num_attention_heads"])
        head_dim = int(cfg.get("head_dim") or cfg["hidden_size"] // heads)
    except (KeyError, TypeError, ValueError) as error:
        raise UserError(f"{config_file} lacks the attention shape ({error})") from None
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    weights_bytes, by_dtype = _weights(folder)
    kv_dtype = _kv_dtype(cfg, by_dtype)
    max_context = cfg.get("max_position_embeddings")
    return ModelShape(
        path=folder,
        model_type=str(config.get("model_type", "unknown")),
        weights_bytes=weights_bytes,
        quantization=_quantization(config, by_dtype),
        kv_heads=kv_heads,
        head_dim=head_dim,
        kv_dtype=kv_dtype,
        kv_dtype_bytes=CONFIG_DTYPES[kv_dtype],
        max_context=int(max_context) if max_context else None,
        layers=_layer_caches(cfg, num_layers, CONFIG_DTYPES[kv_dtype]),
    )

"""KV-cache quantization settings that cannot work, refused before the server starts.

Two checks, both run by `config check`, `start` and `serve`: the quantization group must
divide the model's head size (read from its config.json), and one tiny quantized attention
step must run on the backend mlx uses here (a CUDA build of mlx 0.32 has no kernel for it).
On the CPU backend quantized KV works but decodes about ten times slower: a warning.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ..config import Config
from ..errors import UserError
from .command import Model

SERVER_DEFAULT_GROUP = 64
"""The server's own --kv-group-size default, in force when the config leaves it out."""
GROUP_SIZES = (32, 64, 128)
PROBE_TIMEOUT = 120.0
PROBE = """
import json, sys
import mlx.core as mx
from mlx_lm.models.base import quantized_scaled_dot_product_attention

head, group, bits = (int(a) for a in sys.argv[1:4])
cuda = getattr(mx, "cuda", None)
if mx.default_device() == mx.cpu:
    backend = "cpu"
elif cuda is not None and cuda.is_available():
    backend = "cuda"
else:
    backend = "metal"
try:
    queries = mx.random.normal((1, 2, 1, head))
    keys, values = (mx.quantize(mx.random.normal((1, 2, 8, head)), group, bits) for _ in "kv")
    out = quantized_scaled_dot_product_attention(
        queries, keys, values, scale=head**-0.5, mask=None, group_size=group, bits=bits
    )
    mx.eval(out)
    error = None
except Exception as exc:
    error = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
print(json.dumps({"backend": backend, "error": error}))
"""


@dataclass(frozen=True)
class ProbeResult:
    """What one quantized attention step on the active device said."""

    backend: str  # cpu, metal, cuda
    error: str | None


def model_config(model: Model) -> dict | None:
    """The model's config.json: from its folder, or from the Hugging Face cache for a hub id;
    None when it is not on this machine yet."""
    if model.path is not None:
        file: Path | str | None = model.path / "config.json"
    else:
        from huggingface_hub import try_to_load_from_cache

        file = try_to_load_from_cache(model.spec, "config.json")
    if not isinstance(file, (str, Path)) or not Path(file).is_file():
        return None
    try:
        return json.loads(Path(file).read_text(encoding="utf-8"))
    except ValueError:
        return None


def head_size(model_json: dict) -> int | None:
    """The attention head size a model's config.json gives (text_config for multimodal ones)."""
    for scope in (model_json, model_json.get("text_config") or {}):
        if isinstance(scope.get("head_dim"), int):
            return scope["head_dim"]
        hidden, heads = scope.get("hidden_size"), scope.get("num_attention_heads")
        if isinstance(hidden, int) and isinstance(heads, int) and heads:
            return hidden // heads
    return None


def group_size(config: Config) -> int:
    """The KV quantization group the server will use."""
    return config.options.get("kv_group_size") or SERVER_DEFAULT_GROUP


def check_group_size(config: Config, model: Model) -> int | None:
    """Refuse a group that does not divide the model's head size; the head size, if known."""
    if config.options.get("kv_bits") is None:
        return None
    model_json = model_config(model)
    head = head_size(model_json) if model_json else None
    if head is None:
        return None
    group = group_size(config)
    if head % group:
        fits = [size for size in GROUP_SIZES if head % size == 0]
        allowed = ", ".join(map(str, fits)) or "none of 32, 64, 128: leave kv_bits off"
        raise UserError(
            f"kv_group_size {group} does not divide the head size {head} of model "
            f"{model.argument}: every request would fail; set kv_group_size in {config.path} "
            f"to one of: {allowed}"
        )
    return head


def probe(python: Path, head: int, group: int, bits: int) -> ProbeResult:
    """Run one quantized attention step with the runtime's mlx and mlx_lm."""
    try:
        result = subprocess.run(
            [str(python), "-c", PROBE, str(head), str(group), str(bits)],
            capture_output=True,
            text=True,
            timeout=PROBE_TIMEOUT,
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        return ProbeResult("unknown", f"the probe did not run ({error})")
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        tail = (result.stderr.strip().splitlines() or ["no output"])[-1]
        return ProbeResult("unknown", f"the probe failed: {tail}")
    data = json.loads(lines[-1])
    return ProbeResult(data["backend"], data["error"])


def check(config: Config, python: Path, model: Model) -> list[str]:
    """Every KV quantization check: raise on a setting that cannot work; warnings to show."""
    head = check_group_size(config, model)
    bits = config.options.get("kv_bits")
    if bits is None or head is None:
        return []
    result = probe(python, head, group_size(config), bits)
    if result.error is not None:
        raise UserError(
            f"kv_bits = {bits} cannot run on this machine's {result.backend} backend "
            f"({result.error}); remove kv_bits from {config.path}"
        )
    if result.backend == "cpu":
        start = config.options.get("quantized_kv_start")
        advice = (
            "set quantized_kv_start (e.g. 8192) so that shorter contexts stay in full precision"
            if not start or start < 8192
            else "or leave kv_bits off"
        )
        return [
            "kv_bits on mlx's CPU backend decodes about 10 times slower than full precision; "
            + advice
        ]
    return []

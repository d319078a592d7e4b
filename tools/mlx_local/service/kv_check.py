"""KV-cache quantization settings that cannot work, refused before the server starts.

Two checks, both run by `config check`, `start` and `serve`: mlx-lm must be able to quantize
the model's KV cache (the group divides the head size, no sliding-window layers: the memory
plan's reading of config.json and the weights headers, read once by the caller), and one
tiny quantized attention step must run on the backend mlx uses here (a CUDA build of mlx
0.32 has no kernel for it).
On the CPU backend quantized KV works but decodes about ten times slower: a warning.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ..config import Config
from ..errors import UserError
from ..plan.guard import ModelReading
from ..plan.kv import kv_bits_problem
from ..plan.model_shape import ModelShape
from .command import Model

SERVER_DEFAULT_GROUP = 64
"""The server's own --kv-group-size default, in force when the config leaves it out."""
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


def group_size(config: Config) -> int:
    """The KV quantization group the server will use."""
    return config.options.get("kv_group_size") or SERVER_DEFAULT_GROUP


def check_model(config: Config, model: Model, reading: ModelReading) -> ModelShape | None:
    """Refuse kv_bits on a model whose KV cache mlx-lm cannot quantize with this group (a
    group that does not divide the head size, sliding-window layers); the model's shape (as
    `reading` read it) when kv_bits is set and the model could be read."""
    bits = config.options.get("kv_bits")
    shape = reading.shape
    if bits is None or shape is None:
        return None  # an unreadable model is the server's to report
    problem = kv_bits_problem(shape, group_size(config))
    if problem:
        raise UserError(
            f"kv_bits = {bits} cannot work with model {model.argument}, every request would "
            f"fail: {problem} (in {config.path})"
        )
    return shape


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


def check(config: Config, python: Path, model: Model, reading: ModelReading) -> list[str]:
    """Every KV quantization check: raise on a setting that cannot work; warnings to show."""
    shape = check_model(config, model, reading)
    bits = config.options.get("kv_bits")
    if bits is None or shape is None:
        return []
    result = probe(python, shape.head_dim, group_size(config), bits)
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

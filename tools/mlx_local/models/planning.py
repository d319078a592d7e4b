"""convert-model's plan: options, names, predicted size, disk and runtime checks."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .. import project
from ..errors import UserError
from . import source as model_source
from .names import check_name
from .runtime import probe_runtime
from .source import Source

RECIPES = ("mixed_2_6", "mixed_3_4", "mixed_3_6", "mixed_4_6")


BITS = (2, 3, 4, 5, 6, 8)


GROUP_SIZES = (32, 64, 128)


DTYPES = ("float16", "bfloat16", "float32")


DTYPE_SHORT = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}


DEFAULT_BITS = 4


DISK_MARGIN = 1.05


FreeSpace = Callable[[Path], int]


@dataclass
class ConvertOptions:
    """What the user asked for (the convert-model flags)."""

    revision: str | None = None
    bits: int | None = None
    group_size: int = 64
    recipe: str | None = None
    dtype: str | None = None
    quantize: bool = True
    name: str | None = None
    force: bool = False

    def quantization(self) -> dict | None:
        if not self.quantize:
            return None
        bits = self.bits or DEFAULT_BITS
        return {
            "bits": bits,
            "group_size": self.group_size,
            "mode": "affine",
            "recipe": self.recipe,
        }


@dataclass
class Plan:
    """Everything convert-model decided before doing anything."""

    source: Source
    name: str
    output: Path
    quantization: dict | None
    dtype: str | None
    parameters: int
    predicted_bytes: int
    replaces: bool
    runtime: dict = field(default_factory=dict)  # mlx/mlx_lm versions from the runtime python
    disk: list[dict] = field(default_factory=list)  # per filesystem: where, need, free


def default_name(source: Source, options: ConvertOptions) -> str:
    """`<Model>-MLX-<bits>bit`, `<Model>-MLX-<recipe>`, or `<Model>-MLX-<dtype>`."""
    base = source.display_name
    if not options.quantize:
        dtype = options.dtype or source.config.get("torch_dtype") or "float16"
        return f"{base}-MLX-{DTYPE_SHORT.get(dtype, dtype)}"
    if options.recipe:
        return f"{base}-MLX-{options.recipe}"
    return f"{base}-MLX-{options.bits or DEFAULT_BITS}bit"


def predict_bytes(source: Source, quantization: dict | None, dtype: str | None) -> int:
    """About how big the converted model will be."""
    params = model_source.predicted_parameters(source)
    if quantization is None:
        dtype = dtype or source.config.get("torch_dtype") or "float16"
        bits_per_weight = 8.0 * model_source.BYTES_PER_PARAM.get(dtype, 2)
    else:
        bits_per_weight = quantization["bits"] + 32 / quantization["group_size"]
        if recipe := quantization.get("recipe"):
            low, high = (int(b) for b in recipe.split("_")[1:])
            bits_per_weight = low + 0.15 * (high - low) + 32 / quantization["group_size"]
    others = sum(size for name, size in source.files.items() if not name.endswith(".safetensors"))
    return int(params * bits_per_weight / 8) + others


def _existing_parent(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path


def hub_cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def disk_needs(plan: Plan, free_space: FreeSpace) -> list[dict]:
    """Bytes needed and free on each filesystem involved (download cache, local-models/)."""
    needs: dict[int, dict] = {}
    wants = [(plan.output.parent, plan.predicted_bytes, "output")]
    if plan.source.download_bytes:
        wants.append((hub_cache_dir(), plan.source.download_bytes, "download"))
    for where, amount, what in wants:
        existing = _existing_parent(where)
        entry = needs.setdefault(
            existing.stat().st_dev,
            {"where": str(where), "free": free_space(existing), "need": 0, "parts": {}},
        )
        entry["need"] += int(amount * DISK_MARGIN)
        entry["parts"][what] = amount
    return list(needs.values())


def _free(path: Path) -> int:
    return shutil.disk_usage(path).free


def plan_conversion(
    spec: str,
    options: ConvertOptions,
    proj: project.Project | None = None,
    free_space: FreeSpace = _free,
) -> Plan:
    """Inspect the source and check everything that can be checked before any work."""
    proj = proj or project.current()
    if options.recipe and options.bits:
        raise UserError("--bits and --recipe exclude each other: a recipe sets the bits per layer")
    if not options.quantize and (options.bits or options.recipe):
        raise UserError("--no-quantize excludes --bits and --recipe")
    source = model_source.inspect(spec, options.revision)
    name = check_name(options.name or default_name(source, options))
    output = proj.models_dir / name
    if output.exists() and not options.force:
        raise UserError(
            f"local-models/{name} already exists; use --force to replace it or --name to pick "
            "another name"
        )
    if options.quantize and "quantization" in source.config:
        raise UserError(
            f"{spec} is already quantized by mlx; use it as it is or convert with --no-quantize"
        )
    if not source.model_type:
        source.model_type = _fetch_model_type(source)
    runtime = probe_runtime(source.model_type)
    if not runtime["supported"]:
        raise UserError(
            f"unsupported architecture {source.model_type!r}: mlx_lm {runtime['mlx_lm']} "
            f"has no implementation of it"
        )
    if options.recipe and options.recipe not in runtime["recipes"]:
        raise UserError(
            f"mlx_lm {runtime['mlx_lm']} has no recipe {options.recipe}; it offers "
            + ", ".join(runtime["recipes"])
        )
    quantization = options.quantization()
    plan = Plan(
        source=source,
        name=name,
        output=output,
        quantization=quantization,
        dtype=options.dtype,
        parameters=model_source.predicted_parameters(source),
        predicted_bytes=predict_bytes(source, quantization, options.dtype),
        replaces=output.exists(),
        runtime={k: runtime[k] for k in ("mlx", "mlx_lm", "mlx_lm_path")},
    )
    plan.disk = disk_needs(plan, free_space)
    for entry in plan.disk:
        if entry["need"] > entry["free"]:
            parts = " + ".join(f"{what} {gb(size)}" for what, size in entry["parts"].items())
            raise UserError(
                f"not enough disk space on {entry['where']}: need {gb(entry['need'])} ({parts}, "
                f"5% margin), {gb(entry['free'])} free; free some space or choose fewer --bits"
            )
    return plan


def _fetch_model_type(source: Source) -> str:
    """model_type from config.json, downloading just that file for a hub source."""
    if source.kind == "hub" and source.path is None:
        from huggingface_hub import hf_hub_download

        config_file = Path(hf_hub_download(source.repo_id, "config.json", revision=source.revision))
        source.config = json.loads(config_file.read_text(encoding="utf-8"))
    model_type = source.config.get("model_type")
    if not model_type:
        raise UserError(f"{source.spec}: config.json names no model_type; mlx_lm cannot load it")
    return model_type


def gb(size: int | float) -> str:
    """Human size: 1.23 GB, 456.7 MB, 12.0 kB (decimal units, as disks are sold)."""
    for unit, factor in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= factor:
            return f"{size / factor:.{2 if unit == 'GB' else 1}f} {unit}"
    return f"{int(size)} B"

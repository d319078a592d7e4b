"""The plan's verdict for a configuration, and the refusal to start one whose weights alone
cannot fit this machine's physical memory."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..config import Config
from ..errors import UserError
from ..service.command import Model
from . import machine as machine_mod
from .estimate import Settings, Verdict, gib, verdict
from .kv import kv_bits_problem
from .model_shape import ModelShape, read_shape


def model_folder(model: Model) -> Path | None:
    """The folder holding the model's config.json and weights (a hub model: its snapshot in
    the Hugging Face cache), or None when a hub model is not downloaded yet."""
    if model.path is not None:
        return model.path
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(model.spec, "config.json")
    return Path(found).parent if isinstance(found, str) else None


@dataclass(frozen=True)
class ModelReading:
    """The model's shape from its config.json and safetensors headers, read once at start and
    passed to every check that needs it; or why it could not be read."""

    shape: ModelShape | None
    problem: str = ""  # why `shape` is None


def read_model(model: Model) -> ModelReading:
    """Read the model's shape (nothing to read when a hub model is not downloaded yet)."""
    folder = model_folder(model)
    if folder is None:
        return ModelReading(None, "the model is not downloaded yet")
    try:
        return ModelReading(read_shape(folder))
    except UserError as error:
        return ModelReading(None, str(error))


def config_verdict(config: Config, model: Model, reading: ModelReading) -> Verdict:
    """The verdict for serving `model` (as `reading` read it) with `config` on this machine
    (level "unknown" when the model cannot be read yet). Raises UserError when the weights
    alone exceed physical memory."""
    shape = reading.shape
    if shape is None:
        return Verdict("unknown", f"plan: not checked: {reading.problem}")
    machine = machine_mod.read()
    settings = Settings.from_config(config)
    share = -(-shape.weights_bytes // settings.hosts)
    if share > machine.physical_bytes:
        each = f" (its share on each of {settings.hosts} hosts)" if settings.hosts > 1 else ""
        raise UserError(
            f"model {model.spec!r} cannot fit: its weights alone are {gib(share)}{each} "
            f"and this machine has {gib(machine.physical_bytes)} of physical memory (from "
            f"{machine.physical_source}); choose a smaller "
            "or more strongly quantized model (convert-model --bits 4, or --bits 3)"
        )
    result = verdict(shape, settings, machine)
    problem = settings.kv_bits and kv_bits_problem(shape, settings.kv_group_size)
    if problem:
        result.line += f" (warning: {problem})"
    return result

"""The plan's verdict for a configuration, and the refusal to start one whose weights alone
cannot fit this machine's physical memory."""

from __future__ import annotations

from pathlib import Path

from ..config import Config
from ..errors import UserError
from ..service.command import Model
from . import machine as machine_mod
from .estimate import Settings, Verdict, gib, verdict
from .kv import kv_bits_problem
from .model_shape import read_shape


def model_folder(model: Model) -> Path | None:
    """The folder holding the model's config.json and weights (a hub model: its snapshot in
    the Hugging Face cache), or None when a hub model is not downloaded yet."""
    if model.path is not None:
        return model.path
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(model.spec, "config.json")
    return Path(found).parent if isinstance(found, str) else None


def config_verdict(config: Config, model: Model) -> Verdict:
    """The verdict for serving `model` with `config` on this machine (level "unknown" when the
    model cannot be read yet). Raises UserError when the weights alone exceed physical memory."""
    folder = model_folder(model)
    if folder is None:
        return Verdict("unknown", "plan: not checked: the model is not downloaded yet")
    try:
        shape = read_shape(folder)
    except UserError as error:
        return Verdict("unknown", f"plan: not checked: {error}")
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

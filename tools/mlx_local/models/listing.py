"""What is in local-models/: model folders, their descriptions, removal."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from .. import project
from ..errors import UserError
from ..locking import project_lock
from .manifest import context_length, folder_files, read_manifest
from .names import check_name


def model_folders(models_dir: Path) -> list[Path]:
    """Model folders in local-models/ (hidden temporary folders excluded)."""
    if not models_dir.is_dir():
        return []
    return sorted(
        p
        for p in models_dir.iterdir()
        if p.is_dir() and not p.name.startswith(".") and (p / "config.json").is_file()
    )


def describe(folder: Path) -> dict:
    """One row of `mlx-local models`: from the manifest, else from config.json."""
    files = folder_files(folder)
    manifest = read_manifest(folder)
    row = {"name": folder.name, "path": str(folder), "size_bytes": sum(files.values())}
    if manifest is not None:
        verification = manifest.get("verification") or {}
        return row | {
            "source": manifest.get("source"),
            "quantization": manifest.get("quantization"),
            "dtype": manifest.get("dtype"),
            "parameters": manifest.get("parameters"),
            "context_length": manifest.get("context_length"),
            "created": manifest.get("created"),
            "verified": verification.get("ok"),
            "manifest": True,
        }
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except ValueError:
        config = {}
    quant = config.get("quantization")
    return row | {
        "source": None,
        "quantization": (
            {"bits": quant.get("bits"), "group_size": quant.get("group_size")} if quant else None
        ),
        "dtype": config.get("torch_dtype"),
        "parameters": None,
        "context_length": context_length(config),
        "created": None,
        "verified": None,
        "manifest": False,
    }


def list_models(proj: project.Project | None = None) -> list[dict]:
    """Every model in local-models/, described."""
    proj = proj or project.current()
    return [describe(folder) for folder in model_folders(proj.models_dir)]


def remove_model(name: str, proj: project.Project | None = None) -> Path:
    """Delete local-models/NAME (first renamed aside, so it vanishes at once)."""
    proj = proj or project.current()
    folder = proj.models_dir / check_name(name)
    with project_lock(proj.state_dir, f"models rm {name}"):
        if not folder.is_dir():
            known = ", ".join(p.name for p in model_folders(proj.models_dir)) or "none"
            raise UserError(f"no model {name!r} in local-models/ (there: {known})")
        doomed = proj.models_dir / f".rm-{name}-{os.getpid()}"
        folder.rename(doomed)
        shutil.rmtree(doomed)
    return folder

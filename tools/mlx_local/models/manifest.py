"""The manifest each converted model carries, and what a model folder says about itself."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from . import source as model_source

if TYPE_CHECKING:
    from .planning import Plan

MANIFEST_FILE = "mlx-local-manifest.json"


def folder_files(folder: Path) -> dict[str, int]:
    """Every file below `folder` with its size, the manifest excluded."""
    return {
        p.relative_to(folder).as_posix(): p.stat().st_size
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST_FILE
    }


def read_manifest(folder: Path) -> dict | None:
    file = folder / MANIFEST_FILE
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except ValueError:
        return None


def context_length(config: dict) -> int | None:
    """The longest context the model was trained for, as its config names it."""
    for scope in (config, config.get("text_config") or {}):
        for key in ("max_position_embeddings", "max_sequence_length", "seq_length", "n_ctx"):
            if isinstance(scope.get(key), int):
                return scope[key]
    return None


def build_manifest(plan: Plan, source_dir: Path, folder: Path, result: dict) -> dict:
    source = plan.source
    if source.kind == "hub":
        origin = {
            "kind": "hub",
            "repo_id": source.repo_id,
            "revision": source.revision,
            "requested_revision": source.requested_revision,
        }
    else:
        origin = {
            "kind": "local",
            "path": str(source_dir),
            "content_sha256": model_source.content_hash(source_dir, list(source.files)),
        }
    files = folder_files(folder)
    config = result["config"]
    return {
        "format": 1,
        "name": plan.name,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "source": origin,
        "model_type": config.get("model_type"),
        "quantization": plan.quantization,
        "dtype": plan.dtype or config.get("torch_dtype"),
        "mlx": result["mlx"],
        "mlx_lm": result["mlx_lm"],
        "parameters": result["parameters"],
        "context_length": context_length(config),
        "size_bytes": sum(files.values()),
        "files": files,
        "convert_seconds": result["convert_seconds"],
        "verification": result["verification"],
    }

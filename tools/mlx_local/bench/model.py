"""The models the benchmark runs on: the demo model, or a wider "bench" variant of it.

The bench variant keeps the demo model's tokenizer and chat template and only changes the
architecture: head_dim 64, so KV quantization at group size 64 works as on real models.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from safetensors.numpy import save_file

from ..models import demo_model

BENCH_NAME = "bench-qwen3"
QUICK_NAME = "demo-tiny-qwen3"

# Small enough to prefill 8K tokens in seconds on a CPU, shaped like a real model's attention.
BENCH_ARCHITECTURE = {
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "max_position_embeddings": 32768,
}


def build_bench_model(dest: Path) -> Path:
    """Build the bench model at `dest`: the demo model widened to BENCH_ARCHITECTURE (new random
    weights), built in a temporary folder and renamed into place when complete."""
    tmp = dest.parent / f".tmp-{dest.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        widen(demo_model.build_demo_model(tmp))
        tmp.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def widen(dest: Path) -> None:
    """Give the model folder `dest` the bench architecture and matching random weights."""
    config_file = dest / "config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config.update(BENCH_ARCHITECTURE)
    config_file.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    tok_file = dest / "tokenizer_config.json"
    tok_config = json.loads(tok_file.read_text(encoding="utf-8"))
    tok_config["model_max_length"] = BENCH_ARCHITECTURE["max_position_embeddings"]
    tok_file.write_text(json.dumps(tok_config, indent=2) + "\n", encoding="utf-8")
    save_file(
        demo_model.random_weights(config),
        str(dest / "model.safetensors"),
        metadata={"format": "pt"},
    )


def ensure_model(models_dir: Path, quick: bool) -> Path:
    """The default benchmark model under `models_dir`, built on first use."""
    if quick:
        path = models_dir / QUICK_NAME
        return path if path.is_dir() else demo_model.build_demo_model(path)
    path = models_dir / BENCH_NAME
    return path if path.is_dir() else build_bench_model(path)

"""Variants of the demo model for distributed runs: more layers, wider, or Qwen2's layout.

mlx-lm 0.32.2 splits layers across ranks (`--pipeline`) only for some architectures (Qwen2,
not Qwen3), and every rank needs at least one layer; a wider model makes the per-rank share
of the weights visible next to the runtime's own memory.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from .demo_model import build_demo_model, random_weights


def build_variant(
    dest: Path,
    *,
    model_type: str = "qwen2",
    float32: bool = False,
    force: bool = False,
    **architecture: int,
) -> Path:
    """The demo model at `dest` with `architecture` overrides (e.g. num_hidden_layers=4) and
    the layer layout of `model_type` ("qwen3" or "qwen2"); `float32` weights compute much
    faster than float16 on a CPU."""
    build_demo_model(dest, force=force)
    config = json.loads((dest / "config.json").read_text("utf-8"))
    config.update(architecture)
    config["head_dim"] = config["hidden_size"] // config["num_attention_heads"]
    weights = random_weights(config)
    if model_type == "qwen2":
        config |= {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}
        for name in [n for n in weights if n.endswith(("q_norm.weight", "k_norm.weight"))]:
            del weights[name]
        projections = [n for n in weights if n.endswith(("q_proj.weight", "k_proj.weight"))]
        for name in projections + [n for n in weights if n.endswith("v_proj.weight")]:
            bias = np.zeros(weights[name].shape[0], dtype=np.float16)
            weights[name.removesuffix("weight") + "bias"] = bias
    if float32:
        weights = {name: value.astype(np.float32) for name, value in weights.items()}
        config["torch_dtype"] = "float32"
    (dest / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    save_file(weights, str(dest / "model.safetensors"), metadata={"format": "pt"})
    # The index that converted checkpoints carry: --pipeline loads only the files it names.
    index = {"metadata": {}, "weight_map": dict.fromkeys(sorted(weights), "model.safetensors")}
    (dest / "model.safetensors.index.json").write_text(json.dumps(index, indent=1), "utf-8")
    return dest

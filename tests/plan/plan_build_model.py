"""Build a tiny random-weight model of any mlx-lm architecture: run in the runtime's python.

    python plan_build_model.py FOLDER '<config.json as JSON>' [DTYPE]

Instantiates mlx-lm's own model class for the config (random initial weights, cast to DTYPE,
float16 by default) and writes config.json and model.safetensors, as an MLX model folder holds.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.utils import _get_classes


def main() -> None:
    folder = Path(sys.argv[1])
    config = json.loads(sys.argv[2])
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    dtype = getattr(mx, sys.argv[3] if len(sys.argv) > 3 else "float16")
    weights = {k: v.astype(dtype) for k, v in tree_flatten(model.parameters())}
    folder.mkdir(parents=True)
    mx.save_safetensors(str(folder / "model.safetensors"), weights, metadata={"format": "mlx"})
    (folder / "config.json").write_text(json.dumps(config, indent=2))


if __name__ == "__main__":
    main()

"""Runs inside the runtime python (the one with the patched mlx_lm), as a plain script.

    python convert_runner.py probe MODEL_TYPE RESULT.json
    python convert_runner.py convert SPEC.json RESULT.json

It imports only the standard library and mlx/mlx_lm (never mlx_local) and writes its answer as
JSON to RESULT.json: {"ok": true, ...} or {"ok": false, "kind": ..., "message": ...}.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
import traceback
from pathlib import Path


def versions() -> dict:
    import mlx.core as mx
    import mlx_lm

    return {"mlx": mx.__version__, "mlx_lm": mlx_lm.__version__, "mlx_lm_path": mlx_lm.__file__}


def probe(model_type: str) -> dict:
    """Whether this mlx_lm has an implementation of `model_type`, and the versions."""
    from mlx_lm.convert import QUANT_RECIPES
    from mlx_lm.utils import MODEL_REMAPPING

    module = MODEL_REMAPPING.get(model_type, model_type)
    supported = bool(module) and importlib.util.find_spec(f"mlx_lm.models.{module}") is not None
    return {"ok": True, "supported": supported, "recipes": QUANT_RECIPES, **versions()}


def verify(path: str, max_tokens: int) -> dict:
    """Load the converted model from disk and generate a few tokens greedily."""
    from mlx_lm import load, stream_generate
    from mlx_lm.utils import get_total_parameters

    start = time.perf_counter()
    model, tokenizer, config = load(path, return_config=True)
    messages = [{"role": "user", "content": "Say hello."}]
    if tokenizer.chat_template is not None:
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    else:
        prompt = tokenizer.encode("Hello")
    tokens, text = [], ""
    for response in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens):
        tokens.append(response.token)
        text += response.text
    return {
        "parameters": int(get_total_parameters(model)),
        "verification": {
            "ok": len(tokens) > 0,
            "prompt": messages[0]["content"],
            "generated_tokens": len(tokens),
            "text": text,
            "seconds": round(time.perf_counter() - start, 3),
        },
        "config": config,
    }


def convert(spec: dict) -> dict:
    """mlx_lm's own convert into spec["output"], then verify the result."""
    from mlx_lm.convert import QUANT_RECIPES
    from mlx_lm.convert import convert as mlx_convert

    recipe = spec.get("recipe")
    if recipe and recipe not in QUANT_RECIPES:
        return failure("bad_recipe", f"this mlx_lm offers recipes {', '.join(QUANT_RECIPES)}")
    start = time.perf_counter()
    mlx_convert(
        spec["source"],
        spec["output"],
        quantize=spec["quantize"],
        q_group_size=spec["group_size"],
        q_bits=spec["bits"],
        dtype=spec.get("dtype"),
        quant_predicate=recipe,
    )
    seconds = time.perf_counter() - start
    checked = verify(spec["output"], spec.get("verify_tokens", 4))
    return {"ok": True, "convert_seconds": round(seconds, 3), **checked, **versions()}


def failure(kind: str, message: str) -> dict:
    return {"ok": False, "kind": kind, "message": message}


def classify(error: BaseException) -> dict:
    """Turn an exception into a result a user can act on."""
    message = f"{type(error).__name__}: {error}".strip().replace("\n", " ")
    if isinstance(error, ValueError) and "not supported" in str(error):
        return failure("unsupported_architecture", str(error))
    if "safetensors" in message or "json.exception" in message:
        return failure("corrupt_weights", message)
    if isinstance(error, MemoryError):
        return failure("out_of_memory", "out of memory")
    return failure("failed", message)


def main(argv: list[str]) -> int:
    command, argument, result_file = argv
    try:
        if command == "probe":
            result = probe(argument)
        elif command == "convert":
            result = convert(json.loads(Path(argument).read_text()))
        else:
            result = failure("usage", f"unknown command {command}")
    except ImportError as error:
        result = failure("no_mlx_lm", f"{error} in {sys.executable}")
    except Exception as error:
        traceback.print_exc()
        result = classify(error)
    Path(result_file).write_text(json.dumps(result, default=str))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

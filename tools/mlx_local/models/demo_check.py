"""Check a trained demo model says the script: run in the runtime python (mlx and mlx-lm).

    .venv/bin/python -m mlx_local.models.demo_check [DIR]   (default: the shipped model)

Prints JSON: the teacher-forced margin of every checked exchange, the fallback scores (trained
and held out), and the exchanges whose real greedy generation differs from the script.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

from . import demo_model
from .demo_trainer import Renderer, examples, report


def check(folder: Path) -> dict:
    """Load `folder` with mlx-lm's own loader and check it says the script: the teacher-forced
    margin of every checked example, the fallback scores, and real greedy generation of each
    scripted exchange (thinking on and off, no system prompt) compared with the script."""
    from mlx_lm import load
    from mlx_lm.generate import generate

    model, tokenizer = load(str(folder))
    data = examples(Renderer(tokenizer), random.Random(demo_model.SEED))
    pad = tokenizer.convert_tokens_to_ids(demo_model.ENDOFTEXT)
    result = report(model, data, pad)
    wrong = []
    greedy = [e for e in data if e.check and e.group != "budget"]
    seen = set()
    for e in greedy:
        key = tuple(e.target)
        if key in seen:
            continue
        seen.add(key)
        want = tokenizer.decode(e.target)
        got = generate(model, tokenizer, e.prompt, max_tokens=len(e.target) + 8)
        if got + demo_model.IM_END != want and got != want:
            wrong.append({"want": want, "got": got})
    return {**result, "greedy_checked": len(seen), "greedy_wrong": wrong}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    folder = Path(args[0]) if args else demo_model.shipped_dir()
    print(json.dumps(check(folder), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

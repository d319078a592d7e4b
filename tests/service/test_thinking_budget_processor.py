"""Patch 0012's logits processor (mlx_lm/thinking_budget.py) with real mx arrays, in the
patched runtime: which token it forces at each step, for blocks the prompt or the model
opens, multi-token end markers, a model that began the end marker itself, a rewind (as
speculative decoding does) and a closed block."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.conftest import PatchedRuntime

pytestmark = pytest.mark.slow

START, END, END2, WORD = 7, 8, 9, 4
PROMPT = [1, 2, 3]

RUNNER = """
import json, sys
import mlx.core as mx
from mlx_lm.thinking_budget import ThinkingBudget

def forced(processor, tokens):
    logits = processor(mx.array(tokens), mx.zeros((1, 12), dtype=mx.bfloat16))
    assert logits.shape == (1, 12) and logits.dtype == mx.bfloat16
    allowed = [i for i, v in enumerate(logits[0].tolist()) if v != float("-inf")]
    return allowed[0] if len(allowed) == 1 else None

results = []
for case in json.loads(sys.argv[1]):
    processor = ThinkingBudget(case["budget"], case["start"], case["end"], case["opened"])
    results.append([forced(processor, case["prompt"] + calls) for calls in case["calls"]])
print(json.dumps(results))
"""


def forced_tokens(runtime: PatchedRuntime, cases: list[dict]) -> list[list[int | None]]:
    """For each case, the token forced at each call (None: nothing forced)."""
    result = subprocess.run(
        [str(runtime.python), "-c", RUNNER, json.dumps(cases)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def case(budget: int, opened: bool, generated: list[list[int]], end=(END,)) -> dict:
    return {
        "budget": budget, "start": [START], "end": list(end), "opened": opened,
        "prompt": PROMPT, "calls": generated,
    }  # fmt: skip


def steps(tokens: list[int]) -> list[list[int]]:
    """The generated tokens each call sees when the model says `tokens` one by one."""
    return [tokens[:n] for n in range(len(tokens) + 1)]


def test_which_token_is_forced_when(patched_runtime: PatchedRuntime) -> None:
    w = WORD
    cases = [
        case(2, True, steps([w, w, END, w])),  # the prompt opened the block
        case(0, True, steps([END, w])),  # 0 closes it at once
        case(0, False, steps([w, START, END, w])),  # the model opens it
        case(3, False, steps([START, w, END, w, START, w, w, w, w])),  # closed early, done
        case(2, True, steps([w, w, END, END2, w]), end=(END, END2)),  # a two-token marker
        case(2, True, steps([w, END, END2, w]), end=(END, END2)),  # the model began it
        # A rewind (speculative decoding): back to two tokens, then on again.
        case(2, True, [[], [w], [w, w, w], [w], [w, w]]),
    ]
    assert forced_tokens(patched_runtime, cases) == [
        [None, None, END, None, None],
        [END, None, None],
        [None, None, END, None, None],
        [None, None, None, None, None, None, None, None, None, None],
        [None, None, END, END2, None, None],
        [None, None, END2, None, None],
        [None, None, None, None, END],
    ]

"""Train the scripted demo model: run in the runtime python (the one with mlx and mlx-lm).

    nice -n 0 .venv/bin/python -m mlx_local.models.demo_trainer [--steps N] [--out DIR]

Seeded and offline. Every exchange of demo_script.py is rendered with the model's own chat
template (the tokenizer's apply_chat_template, as the server renders it): with and without
the get_weather tool, thinking on and off, with system prompts, the tool follow-ups, the
multi-turn CONVERSATION, and LONG_THOUGHT closed early by `</think>` (the thinking budget).
Short prompts of data/demo-prompts.txt get FALLBACK; every fifth is held out to measure how
the fallback generalises. The loss is on the assistant's tokens only. Training stops when
every scripted answer's token is the top-1 with probability >= MARGIN at every step
(teacher-forced, which is what greedy decoding reproduces), then the weights (float16), the
tokenizer and a record (hashes of the script, trainer, corpus, template and prompts; seed,
steps, time, margin, held-out score) are written to data/demo-model/. Checkpoints go to
.cache/demo-trainer/ and a run resumes from the last one.

Speed: mlx's CPU backend uses a reference BLAS here (~7 GFLOP/s). OpenBLAS is 10-30x faster;
for a training run (never needed by tests) preload it from a cache folder:

    mkdir -p .cache/openblas && cd .cache/openblas
    apt-get download libopenblas0-pthread libgfortran5 && for d in *.deb; do dpkg-deb -x $d x; done
    L=$PWD/x/usr/lib/x86_64-linux-gnu; cd -
    LD_LIBRARY_PATH=$L LD_PRELOAD=$L/openblas-pthread/libopenblas.so.0 \\
        nice -n 0 .venv/bin/python -m mlx_local.models.demo_trainer
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models import qwen3
from mlx_lm.utils import load_tokenizer

from . import demo_model
from . import demo_script as script

MARGIN = 0.9
PROMPTS_FILE = "demo-prompts.txt"
HELD_OUT_EVERY = 5
CACHE = Path(".cache") / "demo-trainer"
"""Checkpoints and the base files, relative to the folder the trainer runs in (the project)."""


def fallback_prompts() -> tuple[list[str], list[str]]:
    """(trained, held out) short prompts outside the script."""
    text = (resources.files("mlx_local") / "data" / PROMPTS_FILE).read_text(encoding="utf-8")
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
    held = [p for i, p in enumerate(lines) if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1]
    return [p for p in lines if p not in held], held


OTHER_TOOL = {
    "type": "function",
    "function": {
        "name": "read_file",
        "description": "Read a file of the project",
        "parameters": {
            "type": "object",
            "properties": {"path": {"type": "string", "description": "The file's path"}},
            "required": ["path"],
        },
    },
}
"""A second tool some training prompts offer (the script never calls it)."""
AGENT_PARTS = ["<skills_instructions/>", "<permissions instructions/>", "# Environment"]
AGENT_PARTS += ["Be brief.", "x-anthropic-billing-header: cc_version=2.1.328.661;"]


@dataclass
class Example:
    """One rendered exchange: prompt tokens, then target tokens (the loss is on `target`
    where `mask` is 1). `check` examples must reach MARGIN; `group` names the family."""

    prompt: list[int]
    target: list[int]
    mask: list[int]
    group: str
    check: bool
    weight: float = 1.0


class Renderer:
    """Turns messages into token ids with the model's own chat template."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.think_end = tokenizer.encode("</think>", add_special_tokens=False)

    def prompt(self, messages: list[dict], tools: bool | list, thinking: bool) -> list[int]:
        """`tools`: True offers get_weather, a list offers those tools."""
        listed = tools if isinstance(tools, list) else [script.WEATHER_TOOL]
        kwargs = {"tools": listed} if tools else {}
        return list(
            self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, enable_thinking=thinking, **kwargs
            )
        )

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def target(self, thought: str, answer: str, thinking: bool) -> list[int]:
        """What the model says after the generation prompt (ends with <|im_end|>)."""
        text = f"<think>\n{thought}\n</think>\n\n{answer}" if thinking else answer
        return self.encode(text + demo_model.IM_END)


def answer_text(exchange: script.Exchange) -> str:
    if exchange.tool_call is None:
        return exchange.answer
    return f"<tool_call>\n{json.dumps(exchange.tool_call)}\n</tool_call>"


def system(messages: list[dict], prompt: str | None) -> list[dict]:
    return ([{"role": "system", "content": prompt}] if prompt else []) + messages


def examples(r: Renderer, rng: random.Random) -> list[Example]:
    """Every training and checking example (see the module docstring)."""
    out: list[Example] = []
    systems = [None, *script.SYSTEM_PROMPTS]
    exchanges = script.scripted_exchanges()

    def add(messages, tools, thinking, thought, answer, group, check=True, weight=1.0):
        target = r.target(thought, answer, thinking)
        p = r.prompt(messages, tools, thinking)
        out.append(Example(p, target, [1] * len(target), group, check, weight))

    for ex in exchanges:
        answer = answer_text(ex)
        tool_options = [True] if ex.tools else [False, True]
        for sys_prompt in systems:
            for tools in tool_options:
                for thinking in (True, False):
                    messages = system([{"role": "user", "content": ex.prompt}], sys_prompt)
                    # The call copies the city from the prompt: the hardest step to learn.
                    weight = 4.0 if ex.tool_call else 1.0
                    add(messages, tools, thinking, ex.thought, answer, "script", weight=weight)
    # The tool's result, with the thought of the call in the history or without it.
    for city in script.RESULT_CITIES:
        call = script.weather_call(city)
        for condition, temp in script.WEATHER_RESULTS:
            for sys_prompt in systems:
                for thinking, keep in ((True, True), (True, False), (False, False)):
                    assistant = {
                        "role": "assistant",
                        "content": "",
                        "tool_calls": [{"type": "function", "function": call}],
                    }
                    if keep:
                        assistant["reasoning_content"] = script.WEATHER_THOUGHT.format(city=city)
                    messages = system(
                        [
                            {"role": "user", "content": script.WEATHER_PROMPT.format(city=city)},
                            assistant,
                            {
                                "role": "tool",
                                "content": script.weather_result(city, condition, temp),
                            },
                        ],
                        sys_prompt,
                    )
                    answer = script.weather_answer(city, condition, temp)
                    add(messages, True, thinking, script.WEATHER_ANSWER_THOUGHT, answer, "tool")
    # The multi-turn conversation, turn by turn.
    for sys_prompt in systems:
        for thinking in (True, False):
            history: list[dict] = []
            for prompt in script.CONVERSATION:
                ex = scripted(prompt)
                history.append({"role": "user", "content": prompt})
                add(system(list(history), sys_prompt), False, thinking, ex[0], ex[1], "conv")
                history.append({"role": "assistant", "content": ex[1]})
    # Fallbacks: trained prompts in varied settings, and the held-out ones (not trained).
    trained, held = fallback_prompts()
    # Unchecked variety, so the answers depend on the last user turn only: system prompts
    # made of corpus sentences (and agents' several parts), two tools offered.
    sentences = [line.strip() for line in demo_model.corpus_text().split(". ") if line.strip()]

    def random_system() -> str:
        parts = [". ".join(rng.sample(sentences, rng.randint(1, 4))) + "."]
        if rng.random() < 0.5:
            parts += rng.sample(AGENT_PARTS, rng.randint(1, len(AGENT_PARTS)))
        return "\n\n".join(parts)

    for ex in exchanges:
        for _ in range(4):
            tools = [script.WEATHER_TOOL, OTHER_TOOL] if rng.random() < 0.4 else bool(ex.tools)
            if ex.tools and not tools:
                tools = True
            thinking = rng.random() < 0.5
            messages = system([{"role": "user", "content": ex.prompt}], random_system())
            add(messages, tools, thinking, ex.thought, answer_text(ex), "varied", check=False)
    short = [e for e in exchanges if e.tool_call is None and e.prompt != script.STORY_PROMPT]
    for prompt in trained:
        for _ in range(3):
            sys_prompt = rng.choice([*systems, random_system()])
            tools = rng.choice([False, False, True, [script.WEATHER_TOOL, OTHER_TOOL]])
            thinking = rng.random() < 0.5
            messages = [{"role": "user", "content": prompt}]
            if rng.random() < 0.25:  # an earlier scripted turn before it
                before = rng.choice(short)
                messages = [
                    {"role": "user", "content": before.prompt},
                    {"role": "assistant", "content": before.answer},
                    *messages,
                ]
            add(system(messages, sys_prompt), tools, thinking, script.FALLBACK_THOUGHT,
                script.FALLBACK, "fallback", check=False)  # fmt: skip
    for prompt in held:
        for tools, thinking in ((False, True), (False, False), (True, True), (True, False)):
            add([{"role": "user", "content": prompt}], tools, thinking, script.FALLBACK_THOUGHT,
                script.FALLBACK, "held-out", check=False, weight=0.0)  # fmt: skip
    # LONG_THOUGHT closed by `</think>` after k of its tokens: the answer must still follow.
    for sys_prompt in systems:
        for tools in (False, True):
            messages = system([{"role": "user", "content": script.LONG_THOUGHT_PROMPT}], sys_prompt)
            prompt = r.prompt(messages, tools, True)
            full = r.target(script.LONG_THOUGHT, script.LONG_THOUGHT_ANSWER, True)
            end = full.index(r.think_end[0])
            rest = r.encode("\n\n" + script.LONG_THOUGHT_ANSWER + demo_model.IM_END)
            for k in range(1, end):  # k = 1: budget 0, `<think></think>`
                forced = full[:k] + r.think_end
                check = k in (1, script.LONG_THOUGHT_BUDGET, script.LONG_THOUGHT_BUDGET + 1)
                out.append(
                    Example(prompt, forced + rest, [0] * len(forced) + [1] * len(rest),
                            "budget", check and sys_prompt is None, weight=0.15)
                )  # fmt: skip
    return out


def scripted(prompt: str) -> tuple[str, str]:
    """(thought, answer) the script gives `prompt`, FALLBACK's for one outside it."""
    for ex in script.scripted_exchanges():
        if ex.prompt == prompt and ex.tool_call is None:
            return ex.thought, ex.answer
    return script.FALLBACK_THOUGHT, script.FALLBACK


def batch_arrays(batch: list[Example], pad: int) -> tuple[mx.array, mx.array, mx.array]:
    """(inputs, targets, loss mask) of a right-padded batch."""
    seqs = [e.prompt + e.target for e in batch]
    width = max(len(s) for s in seqs) - 1
    inputs = np.full((len(batch), width), pad, dtype=np.int32)
    targets = np.full((len(batch), width), pad, dtype=np.int32)
    mask = np.zeros((len(batch), width), dtype=np.float32)
    for i, (e, s) in enumerate(zip(batch, seqs, strict=True)):
        n = len(s) - 1
        inputs[i, :n] = s[:-1]
        targets[i, :n] = s[1:]
        start = len(e.prompt) - 1
        mask[i, start : start + len(e.target)] = e.mask
    return mx.array(inputs), mx.array(targets), mx.array(mask)


HARD_WEIGHT = 4.0
"""Extra weight of a token by how unsure the model is of it (1 - p): the few tokens where an
answer is chosen (greeting or fallback, which city) get it, the memorised rest does not."""


def loss_fn(model, inputs, targets, mask):
    logits = model(inputs).astype(mx.float32)
    losses = nn.losses.cross_entropy(logits, targets, reduction="none")
    weight = mask * (1 + HARD_WEIGHT * mx.stop_gradient(1 - mx.exp(-losses)))
    return (losses * weight).sum() / mx.maximum(mask.sum(), 1)


def evaluate(model, items: list[Example], pad: int, tokens: int = 6000) -> list[tuple]:
    """Per example: (min top-1 probability of the target, all steps argmax-right)."""
    results = []
    for batch in batches_by_length(items, tokens):
        inputs, targets, mask = batch_arrays(batch, pad)
        probs = mx.softmax(model(inputs).astype(mx.float32), axis=-1)
        p_target = mx.take_along_axis(probs, targets[..., None], axis=-1)[..., 0]
        right = mx.argmax(probs, axis=-1) == targets
        mx.eval(p_target, right)
        p_np, right_np, m_np = np.array(p_target), np.array(right), np.array(mask) > 0
        for i in range(len(batch)):
            results.append((float(p_np[i][m_np[i]].min()), bool(right_np[i][m_np[i]].all())))
    return results


def batches_by_length(items: list[Example], tokens: int) -> list[list[Example]]:
    ordered = sorted(items, key=lambda e: len(e.prompt) + len(e.target))
    out, current = [], []
    for e in ordered:
        width = len(e.prompt) + len(e.target)
        if current and width * (len(current) + 1) > tokens:
            out.append(current)
            current = []
        current.append(e)
    return out + ([current] if current else [])


def report(model, data: list[Example], pad: int, fallbacks: bool = True) -> dict:
    """Margin of the checked examples, and (if `fallbacks`) the fallback scores."""
    checked = [e for e in data if e.check]
    scores = evaluate(model, checked, pad)
    worst = min(range(len(checked)), key=lambda i: scores[i][0])
    groups = {}
    for name in ("fallback", "held-out") if fallbacks else ():
        items = [e for e in data if e.group == name]
        right = [ok for _, ok in evaluate(model, items, pad)]
        groups[name] = f"{sum(right)}/{len(right)}"
    return {
        "min_margin": round(scores[worst][0], 4),
        "worst_group": checked[worst].group,
        "checked_right": f"{sum(ok for _, ok in scores)}/{len(scores)}",
        "below_margin": sum(p < MARGIN for p, _ in scores),
        **groups,
    }


def model_weights(model, dtype=mx.float16) -> dict[str, mx.array]:
    return {k: v.astype(dtype) for k, v in tree_flatten(model.parameters())}


def train(args: argparse.Namespace) -> dict:
    rng = random.Random(demo_model.SEED)
    mx.random.seed(demo_model.SEED)
    work = CACHE / "base"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    config = demo_model.write_base_files(work)
    tokenizer = load_tokenizer(work)
    pad = config["bos_token_id"]
    data = examples(Renderer(tokenizer), rng)
    trainable = [e for e in data if e.weight > 0]
    weights = np.array([e.weight * (5.0 if e.check else 1.0) for e in trainable])
    weights /= weights.sum()
    print(
        f"{len(data)} examples ({sum(e.check for e in data)} checked), "
        f"{sum(len(e.prompt) + len(e.target) for e in trainable)} tokens",
        flush=True,
    )
    model = qwen3.Model(qwen3.ModelArgs.from_dict(config))
    checkpoint = CACHE / "checkpoint.safetensors"
    state_file = CACHE / "checkpoint.json"
    step = 0
    if checkpoint.exists() and not args.fresh:
        model.load_weights(str(checkpoint))
        step = json.loads(state_file.read_text())["step"]
        print(f"resumed at step {step}", flush=True)
    mx.eval(model.parameters())
    warmup = optim.linear_schedule(args.lr / 10, args.lr, 50)
    decay = optim.cosine_decay(args.lr, args.steps, args.lr / 20)
    schedule = optim.join_schedules([warmup, decay], [50])
    optimizer = optim.AdamW(learning_rate=lambda s: schedule(s + step), weight_decay=0.0)
    loss_and_grad = nn.value_and_grad(model, loss_fn)
    np_rng = np.random.default_rng(demo_model.SEED + step)
    started = time.monotonic()
    trained_before = json.loads(state_file.read_text())["seconds"] if step else 0.0
    result = {}
    next_eval = step + args.eval_every
    while step < args.steps:
        picked = np_rng.choice(len(trainable), size=args.pool, p=weights, replace=False)
        for batch in batches_by_length([trainable[i] for i in picked], args.batch_tokens):
            loss, grads = loss_and_grad(model, *batch_arrays(batch, pad))
            optimizer.update(model, grads)
            mx.eval(model.parameters(), optimizer.state, loss)
            step += 1
        if step >= next_eval or step >= args.steps:
            next_eval = step + args.eval_every
            seconds = trained_before + time.monotonic() - started
            result = report(model, data, pad, fallbacks=False)
            print(f"step {step} loss {loss.item():.4f} {seconds:.0f}s {result}", flush=True)
            mx.save_safetensors(str(checkpoint), dict(tree_flatten(model.parameters())))
            state_file.write_text(json.dumps({"step": step, "seconds": seconds}))
            if result["below_margin"] == 0 and step >= args.min_steps:
                break
    seconds = trained_before + time.monotonic() - started
    model.update(tree_unflatten(list(model_weights(model).items())))
    result = report(model, data, pad)  # in float16, as shipped
    print(f"float16: {result}", flush=True)
    record = {
        "hashes": demo_model.source_hashes(),
        "seed": demo_model.SEED,
        "steps": step,
        "train_seconds": round(seconds),
        "margin": MARGIN,
        **result,
        "command": "python -m mlx_local.models.demo_trainer",
    }
    write_model(args.out, work, model, record)
    return record


def write_model(out: Path, work: Path, model, record: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name in (
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ):
        shutil.copyfile(work / name, out / name)
    mx.save_safetensors(
        str(out / "model.safetensors"), model_weights(model), metadata={"format": "pt"}
    )
    (out / demo_model.RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n", "utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=demo_model.shipped_dir())
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--min-steps", type=int, default=0)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--pool", type=int, default=64, help="examples drawn per round")
    parser.add_argument("--batch-tokens", type=int, default=4096)
    parser.add_argument("--eval-every", type=int, default=150)
    parser.add_argument("--fresh", action="store_true", help="ignore the last checkpoint")
    print(json.dumps(train(parser.parse_args(argv)), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

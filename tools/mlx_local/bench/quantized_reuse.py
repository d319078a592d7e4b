"""What patch 0016 changes in time to first token: new conversations with kv_bits, A/B in one
run.

A is the patched server; B the same checkout with patch 0016 taken out (its commit's diff
reversed on a copy of the files), imported by the same interpreter through PYTHONPATH. Both
serve the same model with the same KV quantization at the same time, and get the same new
conversations in turn (each shares only the chat template's first tokens with the others).
The first one reaches an empty prompt cache; every later one finds the earlier ones' caches
stored quantized. Each row shows the TTFT and the tokens the server says it reused.

    python -m mlx_local.bench.quantized_reuse [--conversations 3] [--tokens 1770] [--model DIR]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .. import project
from ..errors import UserError
from ..repo import checkout
from ..service import metrics
from .model import ensure_model
from .prompts import PromptMaker
from .runtime import imported_from, tree_without_patch
from .server import BenchServer

PATCH_FILE = "mlx_lm/prompt_cache_kv_start.py"
KV_BITS = 4
QUANTIZED_KV_START = 256
MAX_TOKENS = 8
REUSED = ("mlx_lm_prompt_tokens_reused_total", (("tier", "memory"),))


@dataclass(frozen=True)
class Turn:
    """One new conversation on one server: its TTFT and the prompt tokens it reused."""

    ttft: float
    reused: int
    prompt_tokens: int | None


def server_args(group_size: int) -> list[str]:
    return [
        "--kv-bits", str(KV_BITS), "--kv-group-size", str(group_size),
        "--quantized-kv-start", str(QUANTIZED_KV_START), "--max-tokens", str(MAX_TOKENS),
    ]  # fmt: skip


def reused_tokens(server: BenchServer) -> int:
    """The server's count of prompt tokens taken from its in-memory prompt cache so far."""
    with urllib.request.urlopen(f"{server.base_url}/metrics", timeout=30) as reply:
        return int(metrics.parse(reply.read().decode())[REUSED])


def turn(server: BenchServer, messages: list[dict]) -> Turn:
    before = reused_tokens(server)
    reply = server.chat(messages, MAX_TOKENS)
    return Turn(reply.ttft, reused_tokens(server) - before, reply.prompt_tokens)


def measure(
    python: Path, repo: Path, model: Path, conversations: int, tokens: int, group_size: int
) -> dict[str, list[Turn]]:
    """Run A (patched) and B (without 0016) side by side; each new conversation goes to both,
    in alternating order."""
    maker = PromptMaker(model)
    prompts = [
        [
            {"role": "system", "content": maker.text(tokens)},
            {"role": "user", "content": "Tell me a story."},
        ]
        for _ in range(conversations)
    ]
    args = server_args(group_size)
    turns: dict[str, list[Turn]] = {"A": [], "B": []}
    with tempfile.TemporaryDirectory(prefix="bench-quantized-reuse-") as tmp:
        tree = tree_without_patch(repo, Path(tmp) / "tree", PATCH_FILE)
        env_b = {"PYTHONPATH": str(tree)}
        if imported_from(python, env_b).resolve() != tree.resolve():
            raise UserError(f"with PYTHONPATH={tree}, {python} does not import mlx_lm from it")
        logs = Path(tmp)
        with (
            BenchServer(python, model, args, logs / "a.log") as a,
            BenchServer(python, model, args, logs / "b.log", env_b) as b,
        ):
            servers = {"A": a, "B": b}
            for i, messages in enumerate(prompts):
                for name in ("A", "B") if i % 2 == 0 else ("B", "A"):
                    turns[name].append(turn(servers[name], messages))
    return turns


def report(turns: dict[str, list[Turn]], tokens: int, group_size: int) -> str:
    """The per-conversation figures and the ratios, as text."""
    lines = [
        f"New conversations of ~{tokens} tokens, kv_bits {KV_BITS}, kv_group_size "
        f"{group_size}, quantized_kv_start {QUANTIZED_KV_START}, {MAX_TOKENS} tokens each.",
        "A: the patched server; B: without patch 0016. reused: prompt tokens taken from a "
        "stored cache (/metrics).",
        f"{'conversation':<14}{'A TTFT':>9}{'reused':>8}{'B TTFT':>10}{'reused':>8}",
    ]
    for i, (a, b) in enumerate(zip(turns["A"], turns["B"], strict=True)):
        label = "1 (first)" if i == 0 else f"{i + 1}"
        lines.append(f"{label:<14}{a.ttft:>8.2f}s{a.reused:>8}{b.ttft:>9.2f}s{b.reused:>8}")
    later = {name: [t.ttft for t in runs[1:]] for name, runs in turns.items()}
    if later["A"]:
        a_next, b_next = statistics.median(later["A"]), statistics.median(later["B"])
        lines += [
            f"next/first TTFT: A {a_next / turns['A'][0].ttft:.2f}x, "
            f"B {b_next / turns['B'][0].ttft:.2f}x",
            f"later conversations, B/A TTFT (medians): {b_next / a_next:.1f}x",
        ]
    return "\n".join(lines)


def main() -> None:
    """Measure and print."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--conversations", type=int, default=3, help="new conversations per server (default 3)"
    )
    parser.add_argument("--tokens", type=int, default=1770, help="tokens a conversation")
    parser.add_argument("--model", type=Path, help="model folder (default: the demo model)")
    parser.add_argument(
        "--kv-group-size", type=int, default=32, help="group size (default 32: the demo model)"
    )
    args = parser.parse_args()
    if args.conversations < 2 or args.tokens <= QUANTIZED_KV_START:
        raise SystemExit(
            f"--conversations must be at least 2 and --tokens above {QUANTIZED_KV_START}"
        )
    proj = project.current()
    repo, _ = checkout.require_checkout(proj)
    model = (args.model or ensure_model(proj.models_dir, quick=True)).resolve()
    try:
        turns = measure(
            project.runtime_python(), repo, model, args.conversations, args.tokens,
            args.kv_group_size,
        )  # fmt: skip
    except UserError as error:
        raise SystemExit(f"error: {error}") from None
    print(report(turns, args.tokens, args.kv_group_size))


if __name__ == "__main__":
    main()

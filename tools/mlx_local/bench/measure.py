"""Measurements against one server, or in-process (KV cache bytes): medians and ratios."""

from __future__ import annotations

import json
import statistics
import subprocess
from pathlib import Path

from ..errors import UserError
from .prompts import PromptMaker
from .runtime import Runtime
from .server import BenchServer, Reply
from .settings import Settings

KV_RUNNER = Path(__file__).with_name("kv_runner.py")


def median(values: list[float | None]) -> float | None:
    """Median of the values that exist, or None."""
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b when both exist."""
    return a / b if a is not None and b else None


class Session:
    """Requests against one server, with the prompts and eos bias of the model."""

    def __init__(self, server: BenchServer, prompts: PromptMaker, bias: dict[int, float]) -> None:
        self.server = server
        self.prompts = prompts
        self.bias = bias

    def ask(self, messages: list[dict], max_tokens: int) -> Reply:
        return self.server.chat(messages, max_tokens, self.bias)

    def first_turn(self, prefix: int, max_tokens: int) -> tuple[list[dict], Reply]:
        """A new conversation whose system prompt is `prefix` tokens long."""
        messages = [
            {"role": "system", "content": self.prompts.text(prefix)},
            {"role": "user", "content": "Summarise the notes above in one line."},
        ]
        return messages, self.ask(messages, max_tokens)

    def next_turn(self, messages: list[dict], reply: Reply, max_tokens: int) -> Reply:
        """The conversation's next turn: everything so far plus a new question."""
        follow_up = [
            *messages,
            {"role": "assistant", "content": reply.text},
            {"role": "user", "content": "Now list three details from it."},
        ]
        return self.ask(follow_up, max_tokens)


def prefix_sweep(session: Session, s: Settings) -> tuple[dict, dict]:
    """TTFT cold vs warm per prefix size, and decode speed at short and long context."""
    ttft = {}
    long_rates: list[float | None] = []
    for prefix in s.prefixes:
        cold, warm, tokens = [], [], []
        for _ in range(s.repeats):
            messages, first = session.first_turn(prefix, s.first_turn_tokens)
            follow = session.next_turn(messages, first, s.decode_tokens)
            cold.append(first.ttft)
            warm.append(follow.ttft)
            tokens.append(first.prompt_tokens)
            if prefix == s.prefixes[-1]:
                long_rates.append(follow.decode_tps)
        cold_s, warm_s = median(cold), median(warm)
        ttft[str(prefix)] = {
            "prompt_tokens": median(tokens),
            "cold_s": cold_s,
            "warm_s": warm_s,
            "warm_over_cold": ratio(warm_s, cold_s),
        }
    short = [
        session.ask([{"role": "user", "content": "Hello."}], s.decode_tokens).decode_tps
        for _ in range(s.repeats)
    ]
    decode = {
        "short_tps": median(short),
        "long_tps": median(long_rates),
        "long_context": s.prefixes[-1],
        "tokens": s.decode_tokens,
    }
    return ttft, decode


def interleaved(session: Session, s: Settings) -> dict:
    """Conversations A, B, then A's next turn: TTFT of the return to A against A's cold TTFT."""
    cold, back = [], []
    for _ in range(s.repeats):
        a_messages, a_first = session.first_turn(s.interleave_prefix, s.first_turn_tokens)
        session.first_turn(s.interleave_prefix, s.first_turn_tokens)
        back.append(session.next_turn(a_messages, a_first, s.first_turn_tokens).ttft)
        cold.append(a_first.ttft)
    cold_s, back_s = median(cold), median(back)
    return {"cold_s": cold_s, "return_to_a_s": back_s, "return_over_cold": ratio(back_s, cold_s)}


def kv_server(session: Session, s: Settings) -> dict:
    """Cold TTFT and decode speed of a long conversation's next turn."""
    cold, rates = [], []
    for _ in range(s.repeats):
        messages, first = session.first_turn(s.kv_server_prefix, s.first_turn_tokens)
        rates.append(session.next_turn(messages, first, s.decode_tokens).decode_tps)
        cold.append(first.ttft)
    return {"context": s.kv_server_prefix, "cold_s": median(cold), "decode_tps": median(rates)}


def kv_in_process(runtime: Runtime, s: Settings) -> dict:
    """KV cache bytes per context length and decode speed per bit width (kv_runner.py)."""
    command = [
        str(runtime.python),
        str(KV_RUNNER),
        "--model",
        str(s.model),
        "--contexts",
        ",".join(map(str, s.kv_contexts)),
        "--bits",
        "0,8,4",
        "--decode-tokens",
        str(s.decode_tokens),
        "--repeats",
        str(s.repeats),
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        tail = result.stderr.strip().splitlines()[-3:]
        raise UserError(f"the KV cache measurement failed: {' | '.join(tail)}")
    data = json.loads(result.stdout.strip().splitlines()[-1])
    longest = str(max(s.kv_contexts))
    full = data["configs"]["fp16"]
    for entry in data["configs"].values():
        entry["bytes_over_fp16"] = ratio(entry["bytes"][longest], full["bytes"][longest])
        entry["decode_over_fp16"] = ratio(entry["decode_tps"], full["decode_tps"])
    return data

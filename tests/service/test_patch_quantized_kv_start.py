"""Patch 0016 on the real server: with --kv-bits, --quantized-kv-start holds for every
conversation, also one the prompt cache could serve from another conversation's quantized
cache.

Before the patch, a new conversation sharing only the chat template's first tokens with a
stored quantized cache got that cache trimmed to those tokens, still quantized: its whole
prompt was prefilled with quantized attention and it answered differently than on a fresh
server. The server's own figures say what happened: /metrics counts the tokens each prompt
reused, and the log names the quantized cache it would not reuse.
"""

from __future__ import annotations

import urllib.request
from pathlib import Path

import openai
import pytest

from mlx_local.bench.prompts import PromptMaker
from mlx_local.service import metrics
from tests.conftest import PatchedRuntime
from tests.helpers import running_server

pytestmark = pytest.mark.slow

QUANTIZED_KV_START = 256
SERVER_ARGS = [
    "--kv-bits", "4", "--kv-group-size", "32",
    "--quantized-kv-start", str(QUANTIZED_KV_START), "--max-tokens", "8",
]  # fmt: skip
REUSED = ("mlx_lm_prompt_tokens_reused_total", (("tier", "memory"),))
PROCESSED = ("mlx_lm_prompt_tokens_processed_total", ())


def conversation(maker: PromptMaker, tokens: int) -> list[dict]:
    """A conversation of about `tokens` tokens that shares only the chat template's tokens
    with any other one (its system prompt starts with a random tag)."""
    return [
        {"role": "system", "content": maker.text(tokens)},
        {"role": "user", "content": "Tell me a story."},
    ]


def answer(client: openai.OpenAI, messages: list[dict]) -> tuple[str, dict, int]:
    """The greedy answer: its text, its tokens with their logprobs, the prompt's length."""
    reply = client.chat.completions.create(
        model="default_model", messages=messages, temperature=0.0, logprobs=True
    )
    choice = reply.choices[0]
    return choice.message.content or "", choice.logprobs.model_dump(), reply.usage.prompt_tokens


def counters(base_url: str) -> dict:
    with urllib.request.urlopen(f"{base_url}/metrics", timeout=30) as reply:
        return metrics.parse(reply.read().decode())


def client_for(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=300)


def test_a_new_conversation_is_not_prefilled_on_a_stored_quantized_cache(
    patched_runtime: PatchedRuntime, demo_model: Path
) -> None:
    maker = PromptMaker(demo_model)
    first, second = conversation(maker, 320), conversation(maker, 320)
    args = ["--model", str(demo_model), *SERVER_ARGS]
    with running_server(patched_runtime.python, args) as (url, log):
        client = client_for(url)
        first_text, _, _ = answer(client, first)  # past 256 tokens: stored quantized
        before = counters(url)
        second_answer, second_logprobs, prompt_tokens = answer(client, second)
        after = counters(url)
        # A follow-up of the first conversation still reuses its quantized cache
        follow_up = [
            *first,
            {"role": "assistant", "content": first_text},
            {"role": "user", "content": "And then?"},
        ]
        answer(client, follow_up)
        last = counters(url)
        text = log.read_text()
    with running_server(patched_runtime.python, args) as (url, _):
        fresh_answer, fresh_logprobs, _ = answer(client_for(url), second)

    assert prompt_tokens > QUANTIZED_KV_START
    assert after[REUSED] - before[REUSED] == 0
    assert after[PROCESSED] - before[PROCESSED] == prompt_tokens
    assert "of a quantized cache (fewer than --quantized-kv-start 256)" in text
    assert second_logprobs["content"], "the answer has tokens"
    # The same tokens with the same logprobs: the same computation as on a fresh server
    assert (second_answer, second_logprobs) == (fresh_answer, fresh_logprobs)
    assert last[REUSED] - after[REUSED] >= QUANTIZED_KV_START

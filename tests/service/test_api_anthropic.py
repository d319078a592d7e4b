"""Patch 0013 on the real server with the `anthropic` package: the Anthropic Messages API
(POST /v1/messages, /v1/messages/count_tokens) answers what the scripted demo model says,
streams the real event sequence, round-trips a tool call, reports the prompt cache, and
refuses in Anthropic's error shape."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import anthropic
import pytest

from mlx_local.models import demo_script as script
from tests.conftest import PatchedRuntime
from tests.service.dialect_helpers import (
    KEY,
    PARIS_ANSWER,
    PARIS_RESULT,
    SERVED,
    SYSTEM_PROMPT,
    WEATHER,
    context_length,
    dialect_server,
    post,
    sse_events,
)

pytestmark = pytest.mark.slow

NO_THINKING = {"type": "disabled"}
THINKING = {"type": "adaptive"}
WEATHER_TOOL = {
    "name": WEATHER["name"],
    "description": WEATHER["description"],
    "input_schema": WEATHER["parameters"],
}
HELLO = [{"role": "user", "content": script.GREETING_PROMPTS[0]}]
AGENT_INSTRUCTIONS = " ".join(
    f"Rule {n}: read the files you change, keep the tests green and answer briefly."
    for n in range(1, 31)
)
"""Stands in for Claude Code's 5,500 characters of instructions: most of the prompt."""


@pytest.fixture(scope="module")
def server(
    patched_runtime: PatchedRuntime, demo_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    cache_dir = tmp_path_factory.mktemp("anthropic-cache")
    with dialect_server(patched_runtime, demo_model, cache_dir) as (url, _):
        yield url


@pytest.fixture(scope="module")
def client(server: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server, api_key=KEY, max_retries=0, timeout=300)


def texts(message, kind: str = "text") -> list[str]:
    return [
        getattr(b, "text" if kind == "text" else "thinking")
        for b in message.content
        if b.type == kind
    ]


def test_a_message_is_the_scripted_greeting(client: anthropic.Anthropic) -> None:
    message = client.messages.create(
        model=SERVED, max_tokens=200, messages=HELLO, thinking=NO_THINKING
    )
    assert message.id.startswith("msg_") and message.model == SERVED
    assert [b.type for b in message.content] == ["text"]
    assert texts(message) == [script.GREETING]
    assert message.stop_reason == "end_turn" and message.stop_sequence is None
    usage = message.usage
    assert usage.input_tokens + usage.cache_read_input_tokens > 0 and usage.output_tokens > 0


def test_a_stream_has_the_real_event_sequence(server: str) -> None:
    body = {
        "model": SERVED, "max_tokens": 200, "stream": True, "thinking": THINKING,
        "system": SYSTEM_PROMPT, "messages": HELLO,
    }  # fmt: skip
    status, headers, raw = post(server, "/v1/messages?beta=true", body, {"x-api-key": KEY})
    assert status == 200 and headers["content-type"] == "text/event-stream"
    events = sse_events(raw)
    names = [name for name, _ in events]
    assert all(name == data["type"] for name, data in events)
    assert names[0] == "message_start" and names[1] == "ping"
    assert names[-2:] == ["message_delta", "message_stop"]
    start = events[0][1]["message"]
    assert start["content"] == [] and start["usage"]["output_tokens"] == 0
    blocks = [d["content_block"]["type"] for n, d in events if n == "content_block_start"]
    assert blocks == ["thinking", "text"]
    thought = "".join(
        d["delta"]["thinking"]
        for n, d in events
        if d.get("delta", {}).get("type") == "thinking_delta"
    )
    text = "".join(
        d["delta"]["text"] for n, d in events if d.get("delta", {}).get("type") == "text_delta"
    )
    assert (thought, text) == (script.GREETING_THOUGHT, script.GREETING)
    assert names.count("content_block_stop") == 2
    delta = events[-2][1]
    assert delta["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert delta["usage"]["output_tokens"] > 0


def test_the_stream_helper_accumulates_thinking_and_text(client: anthropic.Anthropic) -> None:
    with client.messages.stream(
        model=SERVED, max_tokens=200, messages=HELLO, thinking=THINKING
    ) as stream:
        message = stream.get_final_message()
    assert [b.type for b in message.content] == ["thinking", "text"]
    assert texts(message, "thinking") == [script.GREETING_THOUGHT]
    assert texts(message) == [script.GREETING]
    assert message.content[0].signature


def test_thinking_display_omitted_sends_the_thought_in_the_signature_only(
    client: anthropic.Anthropic,
) -> None:
    message = client.messages.create(
        model=SERVED, max_tokens=200, messages=HELLO,
        thinking={"type": "adaptive", "display": "omitted"},
    )  # fmt: skip
    assert [b.type for b in message.content] == ["thinking", "text"]
    assert message.content[0].thinking == "" and message.content[0].signature
    assert texts(message) == [script.GREETING]


@pytest.mark.parametrize("stream", [False, True])
def test_a_tool_round_trip(client: anthropic.Anthropic, stream: bool) -> None:
    question = [{"role": "user", "content": script.WEATHER_PROMPT.format(city="Paris")}]
    call = {"model": SERVED, "max_tokens": 300, "tools": [WEATHER_TOOL], "thinking": THINKING}
    if stream:
        with client.messages.stream(messages=question, **call) as events:
            first = events.get_final_message()
    else:
        first = client.messages.create(messages=question, **call)
    assert first.stop_reason == "tool_use"
    assert [b.type for b in first.content] == ["thinking", "tool_use"]
    use = first.content[1]
    assert use.id.startswith("toolu_") and use.name == "get_weather"
    assert use.input == {"city": "Paris"}
    history = [
        *question,
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": use.id, "content": PARIS_RESULT}],
        },
    ]
    second = client.messages.create(messages=history, **call)
    assert second.stop_reason == "end_turn"
    assert texts(second) == [PARIS_ANSWER]
    # The first turn (its thought and call included) came from the prompt cache.
    first_prompt = first.usage.input_tokens + first.usage.cache_read_input_tokens
    assert second.usage.cache_read_input_tokens >= first_prompt


def test_a_tool_result_as_blocks_is_the_same_prompt(client: anthropic.Anthropic) -> None:
    def prompt_tokens(content) -> int:
        history = [
            {"role": "user", "content": script.WEATHER_PROMPT.format(city="Paris")},
            {
                "role": "assistant",
                "content": [
                    {
                        "type": "tool_use",
                        "id": "toolu_1",
                        "name": "get_weather",
                        "input": {"city": "Paris"},
                    },
                ],
            },  # fmt: skip
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": content},
                ],
            },  # fmt: skip
        ]
        return client.messages.count_tokens(
            model=SERVED, messages=history, tools=[WEATHER_TOOL]
        ).input_tokens

    blocks = [{"type": "text", "text": PARIS_RESULT}]
    assert prompt_tokens(PARIS_RESULT) == prompt_tokens(blocks) > 0


def test_budget_tokens_cut_the_thought_and_the_answer_follows(
    client: anthropic.Anthropic,
) -> None:
    """budget_tokens is the thinking budget (patch 0012's thinking_token_budget)."""
    question = [{"role": "user", "content": script.LONG_THOUGHT_PROMPT}]
    request = {"model": SERVED, "max_tokens": 1000, "messages": question}
    full = client.messages.create(thinking=THINKING, **request)
    assert texts(full, "thinking") == [script.LONG_THOUGHT]
    cut = client.messages.create(thinking={"type": "enabled", "budget_tokens": 16}, **request)
    (thought,) = texts(cut, "thinking")
    assert 0 < len(thought) < len(script.LONG_THOUGHT)
    assert script.LONG_THOUGHT.startswith(thought)
    assert texts(cut) == [script.LONG_THOUGHT_ANSWER]


def test_count_tokens_is_the_prompt_a_message_processes(client: anthropic.Anthropic) -> None:
    request = {"model": SERVED, "messages": HELLO, "system": SYSTEM_PROMPT, "tools": [WEATHER_TOOL]}
    counted = client.messages.count_tokens(**request).input_tokens
    message = client.messages.create(max_tokens=50, **request)
    assert counted == message.usage.input_tokens + message.usage.cache_read_input_tokens
    assert counted > client.messages.count_tokens(model=SERVED, messages=HELLO).input_tokens


def test_a_stop_sequence_ends_the_answer(client: anthropic.Anthropic) -> None:
    message = client.messages.create(
        model=SERVED, max_tokens=200, thinking=NO_THINKING,
        messages=[{"role": "user", "content": script.COUNT_PROMPT}],
        stop_sequences=[script.COUNT_STOP],
    )  # fmt: skip
    assert message.stop_reason == "stop_sequence"
    assert message.stop_sequence == script.COUNT_STOP
    assert texts(message) == ["one, two, three, four, "]


def test_max_tokens_ends_the_answer_and_large_ones_are_clamped(
    client: anthropic.Anthropic,
) -> None:
    story = [{"role": "user", "content": script.STORY_PROMPT}]
    short = client.messages.create(model=SERVED, max_tokens=5, messages=story, thinking=NO_THINKING)
    assert short.stop_reason == "max_tokens" and short.usage.output_tokens == 5
    assert script.STORY.startswith("".join(texts(short)))
    # Claude Code asks models it does not know for 32,000 tokens.
    long = client.messages.create(
        model=SERVED, max_tokens=32000, messages=story, thinking=NO_THINKING
    )
    assert long.stop_reason == "end_turn" and texts(long) == [script.STORY]


def test_errors_have_anthropic_shape_and_status(
    server: str, client: anthropic.Anthropic, demo_model: Path
) -> None:
    with pytest.raises(anthropic.NotFoundError) as missing:
        client.messages.create(model="claude-sonnet-4-5", max_tokens=10, messages=HELLO)
    assert missing.value.body["type"] == "error"
    assert missing.value.body["error"]["type"] == "not_found_error"
    assert SERVED in missing.value.body["error"]["message"]

    too_long = [{"role": "user", "content": "hello " * context_length(demo_model)}]
    with pytest.raises(anthropic.BadRequestError) as overflow:
        client.messages.create(model=SERVED, max_tokens=10, messages=too_long)
    message = overflow.value.body["error"]["message"]
    assert re.fullmatch(r"prompt is too long: \d+ tokens > \d+ maximum", message), message

    bad = [
        b'{"model": "mlx-local", "max_tokens": 10, "messages": [',
        b'{"model": "mlx-local", "max_tokens": "10", "messages": []}',
        b'{"model": "mlx-local", "max_tokens": 10, "messages": "hi"}',
        b'{"model": "mlx-local", "max_tokens": 10, "messages": [{"role": "robot"}]}',
        b'{"max_tokens": 10, "messages": [], "stop_sequences": 5}',
    ]
    for body in bad:
        status, _, answer = post(server, "/v1/messages", body, {"x-api-key": KEY})
        error = json.loads(answer)
        assert status == 400, (body, answer)
        assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
        assert error["error"]["message"]


def test_unknown_fields_and_beta_features_are_ignored(client: anthropic.Anthropic) -> None:
    tool = dict(WEATHER_TOOL, defer_loading=True, cache_control={"type": "ephemeral"})
    message = client.messages.create(
        model=SERVED, max_tokens=200, messages=HELLO, tools=[tool],
        thinking=NO_THINKING, metadata={"user_id": "someone"},
        extra_headers={"anthropic-beta": "context-management-2025-06-27,effort-2025-11-24"},
        extra_body={
            "context_management": {"edits": [{"type": "clear_thinking_20251015"}]},
            "output_config": {"effort": "high"},
            "a_field_from_the_future": {"x": 1},
        },
    )  # fmt: skip
    assert texts(message) == [script.GREETING]


def test_the_key_goes_in_x_api_key_or_a_bearer_token(server: str) -> None:
    for key in (None, "wrong"):
        headers = {"x-api-key": key} if key else {}
        status, _, answer = post(server, "/v1/messages", {"messages": HELLO}, headers)
        assert status == 401
        error = json.loads(answer)
        assert error["error"]["type"] == "authentication_error"
        assert "x-api-key" in error["error"]["message"]
    bearer = anthropic.Anthropic(base_url=server, auth_token=KEY, max_retries=0, timeout=300)
    message = bearer.messages.create(
        model=SERVED, max_tokens=200, messages=HELLO, thinking=NO_THINKING
    )
    assert texts(message) == [script.GREETING]


def claude_code_request(billing: str, prompt: str) -> dict:
    """What Claude Code sends (agents-traffic.md): a per-session billing block, system blocks
    with cache_control, a system message after the first user message, adaptive thinking."""
    cached = {"type": "ephemeral"}
    return {
        "model": SERVED,
        "max_tokens": 32000,
        "stream": True,
        "thinking": {"type": "adaptive", "display": "omitted"},
        "system": [
            {"type": "text", "text": f"x-anthropic-billing-header: cc_version=2.1.328.{billing};"},
            {"type": "text", "text": "You are a Claude agent.", "cache_control": cached},
            {"type": "text", "text": AGENT_INSTRUCTIONS, "cache_control": cached},
        ],
        "tools": [WEATHER_TOOL],
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "<system-reminder>Be brief.</system-reminder>"},
                    {"type": "text", "text": prompt},
                ],
            },  # fmt: skip
            {"role": "system", "content": [{"type": "text", "text": "# Environment"}]},
        ],
    }


def test_a_new_session_reuses_the_prompt_of_the_last(server: str) -> None:
    """The billing block differs per session and is left out of the prompt: the second
    session reads all of its prompt but the user's words and what follows from the cache
    (with the block in the prompt it would read only the first few tokens)."""
    usages = []
    for billing, prompt in (("661", script.GREETING_PROMPTS[0]), ("3a8", script.STORY_PROMPT)):
        request = claude_code_request(billing, prompt)
        status, _, raw = post(server, "/v1/messages?beta=true", request, {"x-api-key": KEY})
        assert status == 200
        events = sse_events(raw)
        assert events[-1][0] == "message_stop"
        usages.append(events[-2][1]["usage"])
    second = usages[1]
    prompt = second["input_tokens"] + second["cache_read_input_tokens"]
    print(f"\nsecond session: {second['cache_read_input_tokens']} of {prompt} prompt tokens cached")
    assert second["cache_read_input_tokens"] >= 0.8 * prompt

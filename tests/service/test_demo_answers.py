"""The scripted demo model through the real server and the `openai` package, by content: tool
calls (streamed and not) and their follow-up, the reasoning field, `enable_thinking = false` in
config.toml, max_tokens, a prompt cache that never changes an answer (cold, warm, from the
disk tier after a restart and after kill -9), and KV quantization that keeps the answers."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from mlx_local.models import demo_script as script
from tests.conftest import PatchedRuntime
from tests.helpers import make_service_project, running_server, server_process
from tests.service.test_disk_cache_crash import LOADED, wait_for_save

pytestmark = pytest.mark.slow

PARIS = script.WEATHER_PROMPT.format(city="Paris")
PARIS_RESULT = script.weather_result("Paris", *script.WEATHER_RESULTS[0])
PARIS_ANSWER = script.weather_answer("Paris", *script.WEATHER_RESULTS[0])
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=300)


def chat(c: openai.OpenAI, messages: list[dict], model: str = "default_model", **kwargs):
    """One greedy chat completion; its first choice (`model`: "mlx-local" where the server
    serves that id, as `mlx-local start` runs it)."""
    kwargs.setdefault("max_tokens", 600)
    response = c.chat.completions.create(model=model, messages=messages, temperature=0.0, **kwargs)
    return response.choices[0]


def reasoning(message) -> str | None:
    """The reasoning field mlx-lm's server adds to a message (outside OpenAI's schema)."""
    return (message.model_extra or {}).get("reasoning")


def said(choice) -> tuple[str | None, str]:
    """(reasoning, content) of a choice, each without the newlines around the think block."""
    thought = reasoning(choice.message)
    return (thought.strip("\n") if thought else None), (choice.message.content or "").lstrip("\n")


@pytest.fixture(scope="module")
def server(patched_runtime: PatchedRuntime, demo_model: Path) -> Iterator[str]:
    with running_server(patched_runtime.python, ["--model", str(demo_model)]) as (url, _):
        yield url


def weather_history(call) -> list[dict]:
    """The question, the model's call, and the tool's result."""
    return [
        {"role": "user", "content": PARIS},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.function.name, "arguments": call.function.arguments},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call.id, "content": PARIS_RESULT},
    ]


def test_a_tool_call_and_its_follow_up(server: str) -> None:
    c = client(server)
    first = chat(c, [{"role": "user", "content": PARIS}], tools=[script.WEATHER_TOOL])
    assert first.finish_reason == "tool_calls"
    (call,) = first.message.tool_calls
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert said(first)[0] == script.WEATHER_THOUGHT.format(city="Paris")
    second = chat(c, weather_history(call), tools=[script.WEATHER_TOOL])
    assert second.finish_reason == "stop"
    assert said(second) == (script.WEATHER_ANSWER_THOUGHT, PARIS_ANSWER)


def test_a_streamed_tool_call(server: str) -> None:
    stream = client(server).chat.completions.create(
        model="default_model",
        messages=[{"role": "user", "content": PARIS}],
        tools=[script.WEATHER_TOOL],
        temperature=0.0,
        max_tokens=300,
        stream=True,
        extra_body=NO_THINKING,
    )
    calls: dict[int, dict] = {}
    finish, content = None, ""
    for chunk in stream:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for delta in choice.delta.tool_calls or []:
            entry = calls.setdefault(delta.index, {"name": "", "arguments": ""})
            entry["name"] += (delta.function and delta.function.name) or ""
            entry["arguments"] += (delta.function and delta.function.arguments) or ""
        finish = choice.finish_reason or finish
    assert finish == "tool_calls" and content.strip() == ""
    assert [(v["name"], json.loads(v["arguments"])) for v in calls.values()] == [
        ("get_weather", {"city": "Paris"})
    ]


def test_thinking_goes_to_the_reasoning_field(server: str) -> None:
    c = client(server)
    for prompt in script.GREETING_PROMPTS:
        choice = chat(c, [{"role": "user", "content": prompt}])
        assert said(choice) == (script.GREETING_THOUGHT, script.GREETING), prompt
        assert "<think>" not in choice.message.content
    off = chat(c, [{"role": "user", "content": "Hello"}], extra_body=NO_THINKING)
    assert said(off) == (None, script.GREETING)
    fallback = chat(c, [{"role": "user", "content": "What is the capital of Peru?"}])
    assert said(fallback) == (script.FALLBACK_THOUGHT, script.FALLBACK)


def conversation(url: str) -> list[str]:
    """The answers to CONVERSATION, turn by turn (thinking off)."""
    c = client(url)
    messages: list[dict] = []
    answers = []
    for prompt in script.CONVERSATION:
        messages.append({"role": "user", "content": prompt})
        answer = said(chat(c, messages, extra_body=NO_THINKING))[1]
        messages.append({"role": "assistant", "content": answer})
        answers.append(answer)
    return answers


CONVERSATION_ANSWERS = [script.GREETING, script.COUNT, script.FALLBACK]


def test_the_conversation_turn_by_turn(server: str) -> None:
    assert conversation(server) == CONVERSATION_ANSWERS


def test_max_tokens_ends_with_length(server: str) -> None:
    story = [{"role": "user", "content": script.STORY_PROMPT}]
    short = chat(client(server), story, max_tokens=5, extra_body=NO_THINKING)
    assert short.finish_reason == "length"
    assert script.STORY.startswith(said(short)[1]) and said(short)[1]
    full = chat(client(server), story, max_tokens=600, extra_body=NO_THINKING)
    assert full.finish_reason == "stop" and said(full)[1] == script.STORY


def test_enable_thinking_false_in_config_toml(
    tmp_path: Path, patched_runtime: PatchedRuntime, demo_model: Path
) -> None:
    proj = make_service_project(
        tmp_path,
        patched_runtime.root,
        patched_runtime.python,
        demo_model,
        "[chat_template_args]\nenable_thinking = false",
        max_tokens=300,
    )
    started = proj.cli("start")
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        c = client(f"http://127.0.0.1:{proj.port}")
        choice = chat(c, [{"role": "user", "content": "Hello"}], "mlx-local")
        assert reasoning(choice.message) is None
        assert "<think>" not in choice.message.content and "</think>" not in choice.message.content
        assert said(choice)[1] == script.GREETING
        first = chat(
            c, [{"role": "user", "content": PARIS}], "mlx-local", tools=[script.WEATHER_TOOL]
        )
        assert reasoning(first.message) is None and first.finish_reason == "tool_calls"
    finally:
        proj.cli("stop")


# The exchanges whose greedy text must not change with the cache or the KV precision.
EXCHANGES = {
    "greeting": ([{"role": "user", "content": "Hello"}], {}),
    "count": ([{"role": "user", "content": script.COUNT_PROMPT}], NO_THINKING),
    "story": ([{"role": "user", "content": script.STORY_PROMPT}], {}),
    "long thought": ([{"role": "user", "content": script.LONG_THOUGHT_PROMPT}], {}),
    "weather": ([{"role": "user", "content": PARIS}], {}),
}


def answers(url: str, model: str = "default_model") -> dict[str, tuple]:
    """Greedy (reasoning, content, tool calls) of every exchange in EXCHANGES."""
    c = client(url)
    out = {}
    for name, (messages, extra) in EXCHANGES.items():
        tools = [script.WEATHER_TOOL] if name == "weather" else None
        kwargs = {"tools": tools} if tools else {}
        choice = chat(c, messages, model, extra_body=extra, **kwargs)
        calls = [(t.function.name, t.function.arguments) for t in choice.message.tool_calls or []]
        out[name] = (*said(choice), calls)
    return out


def scripted_answers() -> dict[str, tuple]:
    return {
        "greeting": (script.GREETING_THOUGHT, script.GREETING, []),
        "count": (None, script.COUNT, []),
        "story": (script.STORY_THOUGHT, script.STORY, []),
        "long thought": (script.LONG_THOUGHT, script.LONG_THOUGHT_ANSWER, []),
        "weather": (
            script.WEATHER_THOUGHT.format(city="Paris"),
            "",
            [("get_weather", json.dumps({"city": "Paris"}))],
        ),
    }


def test_the_prompt_cache_never_changes_an_answer(
    tmp_path: Path, patched_runtime: PatchedRuntime, demo_model: Path
) -> None:
    """The same conversations cold, warm in memory, warm from the disk tier after a restart,
    and after kill -9: the same greedy text, the script's."""
    folder = tmp_path / "prompt-cache"
    args = ["--model", str(demo_model), "--prompt-cache-dir", str(folder)]
    expected = scripted_answers()
    with server_process(patched_runtime.python, args) as (_, url, log):
        assert answers(url) == expected  # cold
        assert answers(url) == expected  # warm, in memory
        wait_for_save(log, 200)
    with server_process(patched_runtime.python, args) as (process, url, log):
        assert answers(url) == expected  # from the disk tier, after a restart
        assert LOADED.search(log.read_text()), log.read_text()[-2000:]
        assert conversation(url) == CONVERSATION_ANSWERS  # new prompts: saved behind
        wait_for_save(log, 40)
        process.send_signal(signal.SIGKILL)
        process.wait()
    with server_process(patched_runtime.python, args) as (_, url, log):
        assert answers(url) == expected  # after kill -9
        assert conversation(url) == CONVERSATION_ANSWERS
        loaded = [int(found[0]) for found in LOADED.findall(log.read_text())]
        assert max(loaded) >= 40, log.read_text()[-2000:]  # the entry saved before the kill


KV_FINDINGS: dict[int, set[str]] = {8: set(), 4: set()}
"""Exchanges whose greedy answer KV quantization changes. Measured on the CPU backend: none,
kv_bits 8 and 4 (group size 32, quantized_kv_start 0) keep all five, the 236-token story and
the long thought included."""


@pytest.mark.parametrize("bits", [8, 4])
def test_kv_quantization_keeps_the_answers(
    bits: int, patched_runtime: PatchedRuntime, demo_model: Path
) -> None:
    args = ["--model", str(demo_model), "--kv-bits", str(bits), "--kv-group-size", "32"]
    args += ["--quantized-kv-start", "0"]
    with running_server(patched_runtime.python, args) as (url, _):
        got = answers(url)
    expected = scripted_answers()
    diverged = {name for name in expected if got[name] != expected[name]}
    for name in sorted(diverged):
        print(f"\nkv_bits {bits}: {name} diverges: {got[name]}")
    assert diverged == KV_FINDINGS[bits]

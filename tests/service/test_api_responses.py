"""Patch 0014 on the real server with the `openai` package: the OpenAI Responses API
(POST /v1/responses) answers what the scripted demo model says, streams the events the SDK
and Codex read, round-trips a function call (statelessly and by previous_response_id),
reports the prompt cache, and refuses in OpenAI's error shape."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import openai
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

WEATHER_TOOL = {"type": "function", "strict": False, **WEATHER}
NO_THINKING = {"effort": "none"}
HELLO = script.GREETING_PROMPTS[0]


@pytest.fixture(scope="module")
def server(
    patched_runtime: PatchedRuntime, demo_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    cache_dir = tmp_path_factory.mktemp("responses-cache")
    with dialect_server(patched_runtime, demo_model, cache_dir) as (url, _):
        yield url


@pytest.fixture(scope="module")
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=300)


def kinds(response) -> list[str]:
    return [item.type for item in response.output]


def thought(item) -> str:
    parts = item.content or item.summary
    return "".join(p.text for p in parts)


def test_a_response_is_the_scripted_greeting(client: openai.OpenAI) -> None:
    response = client.responses.create(model=SERVED, input=HELLO, reasoning=NO_THINKING)
    assert response.id.startswith("resp_") and response.object == "response"
    assert response.status == "completed" and response.model == SERVED
    assert kinds(response) == ["message"] and response.output_text == script.GREETING
    usage = response.usage
    assert usage.input_tokens > 0 and usage.output_tokens > 0
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens


def test_instructions_and_items_and_reasoning(client: openai.OpenAI) -> None:
    response = client.responses.create(
        model=SERVED,
        instructions=SYSTEM_PROMPT,
        input=[
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": HELLO}]}
        ],
    )
    assert kinds(response) == ["reasoning", "message"]
    assert thought(response.output[0]) == script.GREETING_THOUGHT
    assert response.output_text == script.GREETING
    assert response.usage.output_tokens_details.reasoning_tokens > 0


def test_a_stream_has_the_events_the_sdk_and_codex_read(server: str, client) -> None:
    body = {
        "model": SERVED, "input": HELLO, "stream": True, "store": False,
        "reasoning": {"summary": "auto"}, "include": ["reasoning.encrypted_content"],
    }  # fmt: skip
    status, headers, raw = post(server, "/v1/responses", body, {"Authorization": f"Bearer {KEY}"})
    assert status == 200 and headers["content-type"] == "text/event-stream"
    events = sse_events(raw)
    assert all(name == data["type"] for name, data in events)
    assert [data["sequence_number"] for _, data in events] == list(range(len(events)))
    names = [name for name, _ in events]
    assert names[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert names[-1] == "response.completed"
    summary = "".join(d["delta"] for n, d in events if n == "response.reasoning_summary_text.delta")
    text = "".join(d["delta"] for n, d in events if n == "response.output_text.delta")
    assert (summary, text) == (script.GREETING_THOUGHT, script.GREETING)
    done = [d["item"] for n, d in events if n == "response.output_item.done"]
    assert [i["type"] for i in done] == ["reasoning", "message"]
    assert done[0]["encrypted_content"] and done[0]["summary"][0]["text"] == summary
    completed = events[-1][1]["response"]
    assert completed["status"] == "completed" and completed["output"] == done
    assert completed["usage"]["input_tokens_details"]["cached_tokens"] >= 0

    with client.responses.stream(model=SERVED, input=HELLO, reasoning=NO_THINKING) as stream:
        final = stream.get_final_response()
    assert final.output_text == script.GREETING


@pytest.mark.parametrize("stream", [False, True])
def test_a_function_call_round_trip_without_a_store(client: openai.OpenAI, stream: bool) -> None:
    """What Codex does (store false): the next request sends the output items back."""
    question = [{"role": "user", "content": script.WEATHER_PROMPT.format(city="Paris")}]
    call = {
        "model": SERVED, "tools": [WEATHER_TOOL, {"type": "web_search"}], "store": False,
        "include": ["reasoning.encrypted_content"],
    }  # fmt: skip
    if stream:
        with client.responses.stream(input=question, **call) as events:
            first = events.get_final_response()
    else:
        first = client.responses.create(input=question, **call)
    assert kinds(first) == ["reasoning", "function_call"]
    function_call = first.output[1]
    assert function_call.name == "get_weather"
    assert json.loads(function_call.arguments) == {"city": "Paris"}
    # Codex strips the raw thought and keeps encrypted_content: the thought still comes back.
    reasoning = first.output[0].model_dump(exclude_none=True)
    reasoning.pop("content", None)
    history = [
        *question,
        reasoning,
        function_call.model_dump(exclude_none=True),
        {"type": "function_call_output", "call_id": function_call.call_id, "output": PARIS_RESULT},
    ]
    second = client.responses.create(input=history, **call)
    assert second.output_text == PARIS_ANSWER
    first_prompt = first.usage.input_tokens
    assert second.usage.input_tokens_details.cached_tokens >= first_prompt


def test_previous_response_id_continues_a_stored_response(client: openai.OpenAI) -> None:
    question = script.WEATHER_PROMPT.format(city="Paris")
    first = client.responses.create(model=SERVED, input=question, tools=[WEATHER_TOOL])
    function_call = first.output[-1]
    assert function_call.type == "function_call"
    output = {
        "type": "function_call_output",
        "call_id": function_call.call_id,
        "output": PARIS_RESULT,
    }
    second = client.responses.create(
        model=SERVED, previous_response_id=first.id, input=[output], tools=[WEATHER_TOOL]
    )
    assert second.output_text == PARIS_ANSWER
    assert second.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens

    unstored = client.responses.create(model=SERVED, input=HELLO, store=False)
    with pytest.raises(openai.BadRequestError) as unknown:
        client.responses.create(model=SERVED, previous_response_id=unstored.id, input=HELLO)
    assert unknown.value.code == "previous_response_not_found"
    assert unknown.value.param == "previous_response_id"


def test_codex_shaped_input_is_served(client: openai.OpenAI) -> None:
    """Two developer messages and no instructions, item ids, a namespace tool."""
    items = [
        {"type": "message", "id": "msg_1", "role": "developer",
         "content": [{"type": "input_text", "text": SYSTEM_PROMPT}]},
        {"type": "message", "id": "msg_2", "role": "developer", "content": [
            {"type": "input_text", "text": "<skills_instructions/>"},
            {"type": "input_text", "text": "<permissions instructions/>"},
        ]},
        {"type": "message", "id": "msg_3", "role": "user",
         "content": [{"type": "input_text", "text": HELLO}]},
    ]  # fmt: skip
    namespace = {"type": "namespace", "name": "multi_agent_v1", "tools": [WEATHER_TOOL]}
    response = client.responses.create(
        model=SERVED, input=items, tools=[WEATHER_TOOL, namespace], tool_choice="auto",
        parallel_tool_calls=True, store=False, reasoning={"summary": "auto"},
        prompt_cache_key="session-uuid", extra_body={"client_metadata": {"x": "y"}},
    )  # fmt: skip
    assert response.output_text == script.GREETING


def test_max_output_tokens_makes_an_incomplete_response(client: openai.OpenAI) -> None:
    response = client.responses.create(
        model=SERVED, input=script.STORY_PROMPT, reasoning=NO_THINKING, max_output_tokens=5
    )
    assert response.status == "incomplete"
    assert response.incomplete_details.reason == "max_output_tokens"
    assert script.STORY.startswith(response.output_text)
    assert response.usage.output_tokens == 5


def test_errors_have_openai_shape_and_status(server: str, client, demo_model: Path) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        client.responses.create(model="gpt-5-codex", input=HELLO)
    assert missing.value.code == "model_not_found"

    too_long = "hello " * context_length(demo_model)
    with pytest.raises(openai.BadRequestError) as overflow:
        client.responses.create(model=SERVED, input=too_long)
    assert overflow.value.code == "context_length_exceeded"
    body = {"model": SERVED, "input": too_long, "stream": True}
    status, _, raw = post(server, "/v1/responses", body, {"Authorization": f"Bearer {KEY}"})
    events = sse_events(raw)
    assert status == 200 and events[-1][0] == "response.failed"
    assert events[-1][1]["response"]["error"]["code"] == "context_length_exceeded"

    bad = [
        b'{"model": "mlx-local", "input": [',
        b'{"model": "mlx-local", "input": 5}',
        b'{"model": "mlx-local", "input": "hi", "max_output_tokens": "10"}',
        b'{"model": "mlx-local", "input": [{"type": "message", "role": "robot"}]}',
        b'{"model": "mlx-local", "input": "hi", "temperature": -1}',
    ]
    for raw_body in bad:
        status, _, answer = post(
            server, "/v1/responses", raw_body, {"Authorization": f"Bearer {KEY}"}
        )
        assert status == 400, (raw_body, answer)
        error = json.loads(answer)["error"]
        assert error["type"] == "invalid_request_error" and error["message"]

    status, _, answer = post(server, "/v1/responses", {"model": SERVED, "input": HELLO})
    assert status == 401 and json.loads(answer)["error"]["code"] == "invalid_api_key"

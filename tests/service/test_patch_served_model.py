"""Patches 0003 (--served-model-name) and 0004 (--api-key), with the official `openai` client
against the real patched server on the demo model."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.conftest import PatchedRuntime
from tests.helpers import running_server

pytestmark = pytest.mark.slow

SERVED = "mlx-local"
KEY = "test-key-4f1c"
MESSAGES = [{"role": "user", "content": "hello there"}]
MAX_TOKENS = 4


@pytest.fixture(scope="module")
def server(patched_runtime: PatchedRuntime, demo_model: Path) -> Iterator[tuple[str, Path]]:
    """The patched server serving the demo model as `mlx-local`, its key from the environment."""
    args = ["--model", str(demo_model), "--served-model-name", SERVED]
    with running_server(patched_runtime.python, args, env={"MLX_LM_API_KEY": KEY}) as running:
        yield running


def client(base_url: str, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=key, max_retries=0, timeout=120)


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict]:
    """Status and JSON body of a GET, whatever the status."""
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_chat_completion_carries_the_served_name(server: tuple[str, Path]) -> None:
    base_url, _ = server
    answer = client(base_url).chat.completions.create(
        model=SERVED,
        messages=MESSAGES,
        max_tokens=MAX_TOKENS,
        extra_body={"chat_template_kwargs": {"enable_thinking": False}},  # content, no thought
    )
    assert answer.model == SERVED
    assert isinstance(answer.choices[0].message.content, str)
    assert 1 <= answer.usage.completion_tokens <= MAX_TOKENS


def test_streaming_chat_completion(server: tuple[str, Path]) -> None:
    base_url, _ = server
    stream = client(base_url).chat.completions.create(
        model=SERVED, messages=MESSAGES, max_tokens=MAX_TOKENS, stream=True
    )
    chunks = list(stream)
    assert chunks
    assert {chunk.model for chunk in chunks} == {SERVED}
    assert chunks[-1].choices[0].finish_reason in {"length", "stop"}


def test_request_without_a_model_uses_the_loaded_model(server: tuple[str, Path]) -> None:
    base_url, _ = server
    body = {"messages": MESSAGES, "max_tokens": MAX_TOKENS}
    request = urllib.request.Request(
        f"{base_url}/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"},
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        assert json.loads(response.read())["model"] == SERVED


def test_models_list_is_exactly_the_served_name(server: tuple[str, Path]) -> None:
    base_url, _ = server
    assert [model.id for model in client(base_url).models.list()] == [SERVED]
    assert client(base_url).models.retrieve(SERVED).id == SERVED


@pytest.mark.parametrize("other", ["mlx-community/Qwen3-0.6B-4bit", "loaded-model-path"])
def test_other_model_ids_get_404_without_a_load(
    server: tuple[str, Path], demo_model: Path, other: str
) -> None:
    """Even the path of the loaded model is another id: answered 404, nothing loaded."""
    base_url, log_path = server
    model = str(demo_model) if other == "loaded-model-path" else other
    with pytest.raises(openai.NotFoundError) as raised:
        client(base_url).chat.completions.create(
            model=model, messages=MESSAGES, max_tokens=MAX_TOKENS
        )
    error = raised.value
    assert error.status_code == 404
    assert (error.code, error.type, error.param) == (
        "model_not_found",
        "invalid_request_error",
        "model",
    )
    assert model in error.message
    with pytest.raises(openai.NotFoundError):
        client(base_url).models.retrieve(model)
    log = log_path.read_text()
    assert "Traceback" not in log and "huggingface" not in log.lower(), log[-3000:]


def test_wrong_or_missing_key_gets_401(server: tuple[str, Path]) -> None:
    base_url, _ = server
    with pytest.raises(openai.AuthenticationError) as raised:
        client(base_url, key="not-the-key").chat.completions.create(
            model=SERVED, messages=MESSAGES, max_tokens=MAX_TOKENS
        )
    assert raised.value.status_code == 401
    assert raised.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        client(base_url, key="not-the-key").models.list()

    status, body = get(f"{base_url}/v1/models")
    assert status == 401
    assert body["error"]["type"] == "invalid_request_error"
    status, _ = get(f"{base_url}/v1/models", {"Authorization": f"Bearer {KEY}"})
    assert status == 200


def test_health_is_open_without_a_key(server: tuple[str, Path]) -> None:
    base_url, _ = server
    assert get(f"{base_url}/health") == (200, {"status": "ok"})


def test_api_key_flag_and_no_served_name(patched_runtime: PatchedRuntime, demo_model: Path) -> None:
    """--api-key on the command line; without --served-model-name models keep upstream's ids."""
    args = ["--model", str(demo_model), "--api-key", "flag-key"]
    with running_server(patched_runtime.python, args) as (base_url, _):
        with pytest.raises(openai.AuthenticationError):
            client(base_url, key=KEY).chat.completions.create(
                model=str(demo_model), messages=MESSAGES, max_tokens=MAX_TOKENS
            )
        answer = client(base_url, key="flag-key").chat.completions.create(
            model=str(demo_model), messages=MESSAGES, max_tokens=MAX_TOKENS
        )
        assert answer.model == str(demo_model)

"""Patch 0018 on the real server with the `openai` package: chat and text completions match
stop sequences on the decoded text, so one the model writes with other tokens than the word
alone still ends the answer, right before it, with finish_reason "stop"; max_tokens ends it
with "length".

Before the patch (v0.32.2), `stop: ["five"]` never stopped " five" (one token; "five" alone is
"f" "ive") and the word was cut out of the text. On any weights, `logit_bias` makes the model
say " five" over and over; what the scripted demo model says is checked at the end.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from tokenizers import Tokenizer

from mlx_local.models import demo_script as script
from tests.conftest import PatchedRuntime
from tests.service.dialect_helpers import KEY, SERVED, dialect_server

pytestmark = pytest.mark.slow

NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}
HELLO = [{"role": "user", "content": "Hello"}]


@pytest.fixture(scope="module")
def client(
    patched_runtime: PatchedRuntime, demo_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[openai.OpenAI]:
    cache_dir = tmp_path_factory.mktemp("stop-cache")
    with dialect_server(patched_runtime, demo_model, cache_dir) as (url, _):
        yield openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def five(demo_model: Path) -> dict[str, int]:
    """A logit_bias that makes the model say " five" at every step."""
    tokenizer = Tokenizer.from_file(str(demo_model / "tokenizer.json"))
    (token,) = tokenizer.encode(" five").ids
    assert tokenizer.encode("five").ids != [token]  # the word alone is other tokens
    return {str(token): 100}


def chat(client: openai.OpenAI, stream: bool, **request) -> tuple[str, str | None]:
    """(content, finish_reason) of a chat completion, streamed or not."""
    request = {"model": SERVED, "extra_body": NO_THINKING, **request}
    if not stream:
        (choice,) = client.chat.completions.create(**request).choices
        return choice.message.content or "", choice.finish_reason
    content, finish = "", None
    for chunk in client.chat.completions.create(stream=True, **request):
        for choice in chunk.choices:
            content += choice.delta.content or ""
            finish = choice.finish_reason or finish
    return content, finish


@pytest.mark.parametrize("stream", [False, True])
def test_a_stop_word_other_tokens_spell_ends_the_answer_before_it(
    client: openai.OpenAI, five: dict[str, int], stream: bool
) -> None:
    request = {"messages": HELLO, "max_tokens": 8, "logit_bias": five}
    said, finish = chat(client, stream, **request)
    assert (said.split(), finish) == (["five"] * 8, "length")
    assert chat(client, stream, stop=["ve fi"], **request) == ("fi", "stop")
    assert chat(client, stream, stop=["e fiv", "ve f"], **request) == ("fi", "stop")
    assert chat(client, stream, stop="five", **request) == ("", "stop")
    # A stop word that never comes leaves the answer whole.
    assert chat(client, stream, stop=["six"], **request) == (said, "length")


def test_text_completions_stop_on_the_text_too(client: openai.OpenAI, five: dict[str, int]) -> None:
    request = {"model": SERVED, "prompt": "Count:", "max_tokens": 8, "logit_bias": five}
    (choice,) = client.completions.create(stop=["e fiv"], **request).choices
    assert choice.text.strip() == "fiv" and choice.finish_reason == "stop"


# What the scripted demo model says (needs the trained demo model of issue 18).

COUNT = [{"role": "user", "content": script.COUNT_PROMPT}]
BEFORE_STOP = script.COUNT[: script.COUNT.index(script.COUNT_STOP)]


@pytest.mark.parametrize("stream", [False, True])
def test_the_count_stops_right_before_the_stop_sequence(
    client: openai.OpenAI, stream: bool
) -> None:
    said, finish = chat(client, stream, messages=COUNT, max_tokens=100)
    assert (said.strip(), finish) == (script.COUNT, "stop")
    said, finish = chat(client, stream, messages=COUNT, max_tokens=100, stop=[script.COUNT_STOP])
    assert (said.lstrip(), finish) == (BEFORE_STOP, "stop")
    assert BEFORE_STOP == "one, two, three, four, "


@pytest.mark.parametrize("stream", [False, True])
def test_max_tokens_ends_the_count_with_length(client: openai.OpenAI, stream: bool) -> None:
    said, finish = chat(client, stream, messages=COUNT, max_tokens=3)
    assert finish == "length"
    assert said.strip() and script.COUNT.startswith(said.strip())

"""Patches 0013 and 0014 with the rest of the server: the disk tier of the prompt cache serves
a Messages turn after a restart, /metrics counts the requests of both APIs, and a chat
template that refuses a system message after the first does not fail a valid request."""

from __future__ import annotations

import json
import re
import shutil
import urllib.request
from pathlib import Path

import anthropic
import openai
import pytest

from mlx_local.models import demo_script as script
from tests.conftest import PatchedRuntime
from tests.service.dialect_helpers import KEY, SERVED, SYSTEM_PROMPT, dialect_server

pytestmark = pytest.mark.slow

REFUSE_LATE_SYSTEM = (
    "{%- for message in messages %}{%- if message.role == 'system' and not loop.first %}"
    "{{- raise_exception('System message must be at the beginning.') }}"
    "{%- endif %}{%- endfor %}"
)
LONG_SYSTEM = " ".join(f"Rule {n}: keep the tests green and answer briefly." for n in range(40))


def anthropic_client(url: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=url, api_key=KEY, max_retries=0, timeout=300)


def openai_client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=300)


def metrics(url: str) -> dict[str, float]:
    request = urllib.request.Request(f"{url}/metrics", headers={"Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(request, timeout=60) as reply:
        text = reply.read().decode()
    values = re.findall(r"(?m)^(mlx_lm_[a-z_]+(?:\{[^}]*\})?) (\S+)$", text)
    return {name: float(value) for name, value in values}


def test_the_disk_tier_serves_a_turn_after_a_restart_and_metrics_count_it(
    patched_runtime: PatchedRuntime, demo_model: Path, tmp_path: Path
) -> None:
    request = {
        "model": SERVED, "max_tokens": 20, "system": LONG_SYSTEM,
        "messages": [{"role": "user", "content": script.GREETING_PROMPTS[0]}],
    }  # fmt: skip
    cache_dir = tmp_path / "cache"
    with dialect_server(patched_runtime, demo_model, cache_dir) as (url, _):
        cold = anthropic_client(url).messages.create(**request)
        openai_client(url).responses.create(
            model=SERVED, instructions=LONG_SYSTEM, input=script.GREETING_PROMPTS[0]
        )
        counted = metrics(url)
    assert cold.usage.cache_read_input_tokens < 0.5 * cold.usage.input_tokens
    assert counted["mlx_lm_requests_total"] == 2
    assert counted['mlx_lm_prompt_tokens_reused_total{tier="memory"}'] > 0
    with dialect_server(patched_runtime, demo_model, cache_dir) as (url, _):
        warm = anthropic_client(url).messages.create(**request)
        after = metrics(url)
    prompt = warm.usage.input_tokens + warm.usage.cache_read_input_tokens
    print(f"\nafter a restart: {warm.usage.cache_read_input_tokens} of {prompt} tokens from disk")
    assert warm.usage.cache_read_input_tokens >= 0.8 * prompt
    assert after['mlx_lm_prompt_tokens_reused_total{tier="disk"}'] >= (
        warm.usage.cache_read_input_tokens
    )


@pytest.fixture(scope="module")
def strict_model(demo_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo model with a chat template that refuses a system message after the first,
    as Gemma's and Mistral's do."""
    model = tmp_path_factory.mktemp("strict") / "demo-strict"
    shutil.copytree(demo_model, model)
    template_file = model / "chat_template.jinja"
    if template_file.exists():
        template_file.write_text(REFUSE_LATE_SYSTEM + template_file.read_text())
    else:
        config_path = model / "tokenizer_config.json"
        config = json.loads(config_path.read_text())
        config["chat_template"] = REFUSE_LATE_SYSTEM + config["chat_template"]
        config_path.write_text(json.dumps(config))
    return model


def test_a_template_that_refuses_late_system_messages_still_serves(
    patched_runtime: PatchedRuntime, strict_model: Path, tmp_path: Path
) -> None:
    with dialect_server(patched_runtime, strict_model, tmp_path / "cache") as (url, log):
        messages = [
            {"role": "user", "content": script.GREETING_PROMPTS[0]},
            {"role": "system", "content": [{"type": "text", "text": "# Environment"}]},
        ]
        client = anthropic_client(url)
        message = client.messages.create(
            model=SERVED, max_tokens=20, system=SYSTEM_PROMPT, messages=messages
        )
        assert message.stop_reason in ("end_turn", "max_tokens")
        counted = client.messages.count_tokens(
            model=SERVED, system=SYSTEM_PROMPT, messages=messages
        )
        assert counted.input_tokens == (
            message.usage.input_tokens + message.usage.cache_read_input_tokens
        )
        items = [
            {"role": "user", "content": script.GREETING_PROMPTS[0]},
            {"role": "developer", "content": "The user is in a hurry."},
        ]
        response = openai_client(url).responses.create(
            model=SERVED, instructions=SYSTEM_PROMPT, input=items, max_output_tokens=20
        )
        assert response.status in ("completed", "incomplete")
        assert "Retrying with the later system messages as user messages" in log.read_text()

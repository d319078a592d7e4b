"""Patch 0011 `GET /metrics`: read with prometheus_client's own parser after real requests
to the patched server on the demo model; the counters must agree with the completions'
usage (prompt tokens, cached tokens, completion tokens)."""

from __future__ import annotations

import json
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mlx_local.models.demo_model import corpus_text
from mlx_local.service import metrics
from tests.conftest import PatchedRuntime
from tests.helpers import make_service_project, running_server

pytestmark = pytest.mark.slow

SERVED = "mlx-local"
KEY = "metrics-key-93d2"
SYSTEM = corpus_text()[:1500]
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture(scope="module")
def server(patched_runtime: PatchedRuntime, demo_model: Path) -> Iterator[str]:
    """The patched server on the demo model, behind an API key."""
    args = ["--model", str(demo_model), "--served-model-name", SERVED, "--api-key", KEY]
    with running_server(patched_runtime.python, args) as (url, _):
        yield url


def get_metrics(base_url: str, key: str | None = KEY) -> tuple[int, str, str]:
    """Status, content type and body of GET /metrics."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    request = urllib.request.Request(f"{base_url}/metrics", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["Content-Type"], error.read().decode()


def scrape(base_url: str) -> tuple[dict[str, str], Samples]:
    """Each metric family's type, and every sample by (name, labels), parsed by
    prometheus_client."""
    status, _, text = get_metrics(base_url)
    assert status == 200, text
    types: dict[str, str] = {}
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return types, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def chat(base_url: str, messages: list[dict], stream: bool = False) -> tuple[str, dict]:
    """One chat completion through the openai client: (its text, its usage)."""
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key=KEY, max_retries=0, timeout=120)
    common = {"model": SERVED, "messages": messages, "max_tokens": 8, "temperature": 0.0}
    if not stream:
        answer = client.chat.completions.create(**common)
        return answer.choices[0].message.content or "", answer.usage.model_dump()
    chunks = list(
        client.chat.completions.create(
            **common, stream=True, stream_options={"include_usage": True}
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks[-1].usage.model_dump()


def cached(usage: dict) -> int:
    return (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0


def test_metrics_need_the_api_key(server: str) -> None:
    assert get_metrics(server, key=None)[0] == 401
    assert get_metrics(server, key="wrong")[0] == 401
    status, content_type, _ = get_metrics(server)
    assert status == 200
    assert content_type.startswith("text/plain; version=0.0.4")


def test_families_and_types(server: str) -> None:
    types, samples = scrape(server)
    expected = {
        "mlx_lm_requests": "counter",
        "mlx_lm_prompt_tokens_processed": "counter",
        "mlx_lm_prompt_tokens_reused": "counter",
        "mlx_lm_generation_tokens": "counter",
        "mlx_lm_time_to_first_token_seconds": "histogram",
        "mlx_lm_decode_tokens_per_second": "histogram",
        "mlx_lm_prompt_cache_entries": "gauge",
        "mlx_lm_prompt_cache_bytes": "gauge",
        "mlx_lm_memory_active_bytes": "gauge",
        "mlx_lm_memory_peak_bytes": "gauge",
        "mlx_lm_memory_cache_bytes": "gauge",
    }
    assert {name: types.get(name) for name in expected} == expected
    for tier in ("memory", "disk"):
        assert ("mlx_lm_prompt_tokens_reused_total", (("tier", tier),)) in samples
    # The model is loaded: mlx holds its weights.
    assert value(samples, "mlx_lm_memory_active_bytes") > 0
    assert value(samples, "mlx_lm_memory_peak_bytes") >= value(
        samples, "mlx_lm_memory_active_bytes"
    )


def test_cold_turn_processes_and_warm_turn_reuses(server: str) -> None:
    messages = [
        {"role": "system", "content": f"Project Kestrel\n{SYSTEM}"},
        {"role": "user", "content": "Summarise the notes."},
    ]
    _, before = scrape(server)
    answer, cold = chat(server, messages)
    _, after_cold = scrape(server)
    processed = delta(before, after_cold, "mlx_lm_prompt_tokens_processed_total")
    reused = delta(before, after_cold, "mlx_lm_prompt_tokens_reused_total", tier="memory")
    # Exactly what the usage says was computed and what came from the cache.
    assert processed == cold["prompt_tokens"] - cached(cold)
    assert reused == cached(cold)
    assert processed > reused

    follow_up = [
        *messages,
        {"role": "assistant", "content": answer},
        {"role": "user", "content": "And then?"},
    ]
    _, warm = chat(server, follow_up, stream=True)
    _, after_warm = scrape(server)
    processed = delta(after_cold, after_warm, "mlx_lm_prompt_tokens_processed_total")
    reused = delta(after_cold, after_warm, "mlx_lm_prompt_tokens_reused_total", tier="memory")
    assert processed == warm["prompt_tokens"] - cached(warm)
    assert reused == cached(warm)
    assert reused > processed > 0
    assert delta(before, after_warm, "mlx_lm_prompt_tokens_reused_total", tier="disk") == 0

    generated = cold["completion_tokens"] + warm["completion_tokens"]
    assert delta(before, after_warm, "mlx_lm_generation_tokens_total") == generated
    assert delta(before, after_warm, "mlx_lm_requests_total") == 2
    assert delta(before, after_warm, "mlx_lm_time_to_first_token_seconds_count") == 2
    assert delta(before, after_warm, "mlx_lm_time_to_first_token_seconds_sum") > 0
    assert value(after_warm, "mlx_lm_time_to_first_token_seconds_bucket", le="+Inf") == value(
        after_warm, "mlx_lm_time_to_first_token_seconds_count"
    )
    decoded = sum(1 for usage in (cold, warm) if usage["completion_tokens"] > 1)
    assert delta(before, after_warm, "mlx_lm_decode_tokens_per_second_count") == decoded

    assert value(after_warm, "mlx_lm_prompt_cache_entries", tier="memory") >= 1
    assert value(after_warm, "mlx_lm_prompt_cache_bytes", tier="memory") > 0


def test_disk_tier_is_counted_apart(
    patched_runtime: PatchedRuntime, demo_model: Path, tmp_path: Path
) -> None:
    probe = (
        "from mlx_lm.prompt_cache_disk import TieredPromptCache as T; "
        "print(hasattr(T, 'disk_stats'))"
    )
    shown = subprocess.run(
        [str(patched_runtime.python), "-c", probe], capture_output=True, text=True, check=True
    )
    if shown.stdout.strip() != "True":
        pytest.skip("this queue's disk tier does not report disk_stats()/last_fetch_tier yet")
    args = [
        "--model",
        str(demo_model),
        "--served-model-name",
        SERVED,
        "--api-key",
        KEY,
        "--prompt-cache-dir",
        str(tmp_path / "prompt-cache"),
    ]
    messages = [
        {"role": "system", "content": f"Project Heron\n{SYSTEM}"},
        {"role": "user", "content": "Summarise the notes."},
    ]
    with running_server(patched_runtime.python, args) as (url, _):
        answer, _ = chat(url, messages)
    follow_up = [
        *messages,
        {"role": "assistant", "content": answer},
        {"role": "user", "content": "And then?"},
    ]
    with running_server(patched_runtime.python, args) as (url, _):
        _, before = scrape(url)
        assert value(before, "mlx_lm_prompt_cache_entries", tier="disk") >= 1
        assert value(before, "mlx_lm_prompt_cache_bytes", tier="disk") > 0
        _, usage = chat(url, follow_up)
        _, after = scrape(url)
    assert delta(before, after, "mlx_lm_prompt_tokens_reused_total", tier="disk") == cached(usage)
    assert delta(before, after, "mlx_lm_prompt_tokens_reused_total", tier="memory") == 0
    assert cached(usage) > 0


def test_own_parser_agrees_with_prometheus_client(server: str) -> None:
    _, samples = scrape(server)
    _, _, text = get_metrics(server)
    assert metrics.parse(text) == samples


def test_status_shows_the_metrics(
    patched_runtime: PatchedRuntime, demo_model: Path, tmp_path: Path
) -> None:
    proj = make_service_project(
        tmp_path, patched_runtime.root, patched_runtime.python, demo_model, f'api_key = "{KEY}"'
    )
    try:
        started = proj.cli("start")
        assert started.returncode == 0, started.stdout + started.stderr
        base_url = f"http://127.0.0.1:{proj.port}"
        _, usage = chat(base_url, [{"role": "user", "content": "Summarise the notes."}])
        result = proj.cli("status", "--json")
        assert result.returncode == 0, result.stderr
        shown = json.loads(result.stdout)["metrics"]
        _, samples = scrape(base_url)
        panel = proj.cli("status").stdout
    finally:
        proj.cli("stop")

    assert shown["requests"] == 1
    assert shown["generation_tokens"] == usage["completion_tokens"]
    assert shown["prompt_tokens_processed"] == usage["prompt_tokens"] - cached(usage)
    assert shown["prompt_tokens_reused_memory"] + shown["prompt_tokens_reused_disk"] == cached(
        usage
    )
    assert shown["cache_hit_rate"] == pytest.approx(cached(usage) / usage["prompt_tokens"])
    assert shown["time_to_first_token_mean_seconds"] > 0
    assert shown["cache_entries_memory"] == value(
        samples, "mlx_lm_prompt_cache_entries", tier="memory"
    )
    assert shown["cache_entries_memory"] >= 1
    assert shown["memory_active_bytes"] > 0
    assert shown["memory_peak_bytes"] >= shown["memory_active_bytes"]
    for label in ("cache hit rate", "prompt tokens", "mlx memory", "first token"):
        assert label in panel


def test_metrics_summary_says_why_it_is_missing(server: str) -> None:
    host, port = server.removeprefix("http://").split(":")
    with pytest.raises(metrics.Unavailable, match="the API key was refused"):
        metrics.fetch(host, int(port), key=None)
    assert metrics.fetch(host, int(port), key=KEY).requests >= 0

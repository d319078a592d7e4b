"""Helpers for the tests of the Anthropic Messages and OpenAI Responses APIs (patches 0013,
0014): the patched server on the demo model, raw requests, server-sent events."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

from mlx_local.models import demo_script as script
from tests.conftest import PatchedRuntime
from tests.helpers import running_server

SERVED = "mlx-local"
KEY = "test-key-0013"
SYSTEM_PROMPT = "You are a helpful assistant."
WEATHER = script.WEATHER_TOOL["function"]
PARIS_RESULT = script.weather_result("Paris", *script.WEATHER_RESULTS[0])
PARIS_ANSWER = script.weather_answer("Paris", *script.WEATHER_RESULTS[0])


@contextmanager
def dialect_server(
    runtime: PatchedRuntime, model: Path, cache_dir: Path, *extra: str
) -> Iterator[tuple[str, Path]]:
    """The patched server on `model` with the served id, an API key and the disk cache tier:
    yields (base URL, log path)."""
    args = ["--model", str(model), "--served-model-name", SERVED]
    args += ["--prompt-cache-dir", str(cache_dir), *extra]
    with running_server(runtime.python, args, env={"MLX_LM_API_KEY": KEY}) as server:
        yield server


def context_length(model: Path) -> int:
    """The model's context: what the server clamps to and checks prompts against."""
    return json.loads((model / "config.json").read_text())["max_position_embeddings"]


def post(
    url: str, path: str, body: bytes | dict, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """POST a raw body; (status, headers in lower case, body)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=300)
    try:
        sent = {"Content-Type": "application/json", **(headers or {})}
        connection.request("POST", path, body=data, headers=sent)
        reply = connection.getresponse()
        return reply.status, {k.lower(): v for k, v in reply.getheaders()}, reply.read()
    finally:
        connection.close()


def sse_events(body: bytes) -> list[tuple[str | None, dict]]:
    """The (event name, data) of each server-sent event of a stream; comments skipped."""
    events = []
    for block in body.decode().split("\n\n"):
        name, data = None, []
        for line in block.splitlines():
            if line.startswith("event: "):
                name = line[len("event: ") :]
            elif line.startswith("data: "):
                data.append(line[len("data: ") :])
        if data:
            events.append((name, json.loads("\n".join(data))))
    return events

"""Patch 0010 on the real server: malformed requests get a 400 JSON error, the server lives.

Before the patch, `"stop": 5` stopped the generation thread for good (every later request
failed and /health said 503), a non-UTF-8 body got no answer, and `"stream_options": {}`
broke a stream after its 200.
"""

from __future__ import annotations

import http.client
import json
import urllib.parse
from pathlib import Path

import pytest

from mlx_local.service import loadtest
from tests.conftest import PatchedRuntime
from tests.helpers import running_server

pytestmark = pytest.mark.slow

HI = [{"role": "user", "content": "hi"}]
BAD_BODIES = [
    json.dumps({"messages": HI, "stop": 5, "max_tokens": 4}).encode(),
    json.dumps({"messages": HI, "stop": ["a", 1], "max_tokens": 4}).encode(),
    json.dumps({"messages": HI, "stream": True, "stream_options": 5}).encode(),
    json.dumps({"messages": {"role": "user"}, "max_tokens": 4}).encode(),
    b"\xff\xfe{}",
]


def post(url: str, body: bytes) -> tuple[int, bytes]:
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        connection.request("POST", "/v1/chat/completions", body=body)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def test_malformed_requests_get_400_and_the_server_stays_healthy(
    patched_runtime: PatchedRuntime, demo_model: Path
) -> None:
    with running_server(patched_runtime.python, ["--model", str(demo_model)]) as (url, _):
        for body in BAD_BODIES:
            status, answer = post(url, body)
            assert status == 400, (body, status, answer)
            assert json.loads(answer)["error"], answer
        assert loadtest.healthy(url)
        # A stream with stream_options {} (include_usage is optional) runs to its end.
        body = {"messages": HI, "max_tokens": 4, "stream": True, "stream_options": {}}
        status, answer = post(url, json.dumps(body).encode())
        assert status == 200
        assert answer.decode().rstrip().endswith("data: [DONE]")
        # Valid requests still work: the generation thread is alive.
        body = {"messages": HI, "max_tokens": 4, "stop": ["zz"]}
        status, answer = post(url, json.dumps(body).encode())
        assert status == 200 and json.loads(answer)["choices"][0]["finish_reason"]

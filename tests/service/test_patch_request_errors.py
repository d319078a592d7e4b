"""Patch 0010 on the real server: malformed requests get a 400 JSON error, the server lives.

Before the patch, `"stop": 5` stopped the generation thread for good (every later request
failed and /health said 503), a non-UTF-8 body got no answer, `"stream_options": {}`
broke a stream after its 200, and a negative Content-Length left the connection waiting
forever (a huge one dropped it unanswered).
"""

from __future__ import annotations

import http.client
import json
import socket
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


BAD_LENGTHS = [
    ["-5"],
    ["-1"],
    ["99999999999999999999"],  # OverflowError in rfile.read before the patch
    [str(1 << 40)],  # 1 TiB: MemoryError before the patch
    ["12abc"],
    ["5, 7"],
    ["5", "7"],  # two Content-Length headers that disagree
]
# Every POST endpoint, the ones later patches add (/v1/messages, /v1/responses) and a GET
PATHS = [
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/messages"),
    ("POST", "/v1/responses"),
    ("GET", "/health"),
]


def exchange(port: int, request: bytes) -> bytes:
    """Send `request` on a new connection and read until the server closes it (a server that
    keeps the connection waiting fails the test with a timeout)."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as connection:
        connection.sendall(request)
        chunks = []
        while chunk := connection.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_a_bad_content_length_gets_400_and_a_closed_connection(
    patched_runtime: PatchedRuntime, demo_model: Path
) -> None:
    body = json.dumps({"messages": HI, "max_tokens": 2}).encode()
    with running_server(patched_runtime.python, ["--model", str(demo_model)]) as (url, _):
        port = urllib.parse.urlsplit(url).port
        for lengths in BAD_LENGTHS:
            for method, path in PATHS:
                head = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}"]
                head += [f"Content-Length: {length}" for length in lengths]
                reply = exchange(port, ("\r\n".join(head) + "\r\n\r\n").encode() + body)
                status_line, _, rest = reply.partition(b"\r\n")
                headers, _, answer = rest.partition(b"\r\n\r\n")
                assert status_line.split()[1] == b"400", (lengths, path, reply)
                assert b"Connection: close" in headers.split(b"\r\n")
                error = json.loads(answer)["error"]
                assert error["code"] == "invalid_content_length", error
                assert "Content-Length" in error["message"]
        # The next client is served: the server and its generation thread are fine
        status, answer = post(url, body)
        assert status == 200 and json.loads(answer)["choices"][0]["finish_reason"]
        assert loadtest.healthy(url)

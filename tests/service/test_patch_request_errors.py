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


def post(url: str, body: bytes, path: str = "/v1/chat/completions") -> tuple[int, bytes]:
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        connection.request("POST", path, body=body)
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
    ("POST", "/v1/messages/count_tokens"),
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


# The other APIs (patches 0013, 0014): the same checks, answered in each API's error shape.
DIALECT_BAD_BODIES = {
    "/v1/messages?beta=true": [
        b"\xff\xfe{}",
        b'{"max_tokens": 4, "messages": [{"role": "user", "content": "hi"}',
        b"[1, 2]",
        b'{"max_tokens": 4, "messages": [{"role": "user", "content": "hi"}], "stop_sequences": 5}',
        b'{"max_tokens": 4, "messages": [{"role": "user", "content": [7]}]}',
        b'{"max_tokens": 4.5, "messages": [{"role": "user", "content": "hi"}]}',
    ],
    "/v1/messages/count_tokens": [
        b"\xff\xfe{}",
        b'{"messages": [{"role": "user", "content": "hi"}',
        b"[1, 2]",
        b'{"messages": [{"role": "user", "content": [7]}]}',
        b'{"messages": "hi"}',
    ],
    "/v1/responses": [
        b"\xff\xfe{}",
        b'{"input": [{"role": "user", "content": "hi"}',
        b"[1, 2]",
        b'{"input": 5}',
        b'{"input": "hi", "max_output_tokens": "4"}',
        b'{"input": [{"type": "message", "role": "user", "content": {}}]}',
    ],
}


def anthropic_error(answer: bytes) -> bool:
    error = json.loads(answer)
    return error["type"] == "error" and bool(error["error"]["message"])


def openai_error(answer: bytes) -> bool:
    error = json.loads(answer)["error"]
    return error["type"] == "invalid_request_error" and bool(error["message"])


SHAPES = {
    "/v1/messages?beta=true": anthropic_error,
    "/v1/messages/count_tokens": anthropic_error,
    "/v1/responses": openai_error,
}


def test_malformed_requests_to_the_other_apis_get_400_in_their_shape(
    patched_runtime: PatchedRuntime, demo_model: Path
) -> None:
    with running_server(patched_runtime.python, ["--model", str(demo_model)]) as (url, _):
        for path, bodies in DIALECT_BAD_BODIES.items():
            shaped = SHAPES[path]
            for body in bodies:
                status, answer = post(url, body, path)
                assert status == 400 and shaped(answer), (path, body, status, answer)
            # No Content-Length: the chat code's 411, in this API's shape
            parts = urllib.parse.urlsplit(url)
            connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
            connection.putrequest("POST", path)
            connection.endheaders()
            reply = connection.getresponse()
            assert reply.status == 411 and shaped(reply.read())
            connection.close()
        assert loadtest.healthy(url)
        # Valid requests still work: the generation thread is alive.
        message = json.dumps({"max_tokens": 4, "messages": HI}).encode()
        status, answer = post(url, message, "/v1/messages")
        assert status == 200 and json.loads(answer)["stop_reason"]
        response = json.dumps({"input": "hi", "max_output_tokens": 4}).encode()
        status, answer = post(url, response, "/v1/responses")
        assert status == 200 and json.loads(answer)["status"] in ("completed", "incomplete")

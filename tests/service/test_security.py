"""Patch 0008 against the real patched server, over real HTTP: a foreign Host (DNS
rebinding) gets 403 on every endpoint, a foreign Origin gets 403 and no CORS allow header,
local names and local origins keep working (the openai client, curl to localhost), and a
local page's preflight gets the headers a client that sends a key needs."""

from __future__ import annotations

import http.client
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import openai
import pytest

from tests.conftest import PatchedRuntime
from tests.helpers import running_server

pytestmark = pytest.mark.slow

SERVED = "mlx-local"
KEY = "browser-key-4f1a"
LOCAL_ORIGINS = "http://localhost:*,http://127.0.0.1:*,http://[::1]:*"
CHAT = {"model": SERVED, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
# What a browser lists in a preflight (lower case, sorted) before the openai and anthropic
# JavaScript packages' requests from a page: the key and their own headers.
CLIENT_HEADERS = (
    "anthropic-beta,anthropic-dangerous-direct-browser-access,anthropic-version,"
    "authorization,content-type,x-api-key,x-stainless-arch,x-stainless-lang,x-stainless-os,"
    "x-stainless-package-version,x-stainless-retry-count,x-stainless-runtime,"
    "x-stainless-runtime-version,x-stainless-timeout"
)
# Every endpoint of the server, and one it does not have.
ENDPOINTS = [
    ("GET", "/health"),
    ("GET", "/v1/models"),
    ("GET", f"/v1/models/{SERVED}"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/chat/completions"),
    ("POST", "/v1/messages?beta=true"),
    ("POST", "/v1/messages/count_tokens"),
    ("POST", "/v1/responses"),
    ("OPTIONS", "/v1/chat/completions"),
    ("GET", "/no/such/endpoint"),
]


@pytest.fixture(scope="module")
def server(patched_runtime: PatchedRuntime, demo_model: Path) -> Iterator[tuple[int, Path]]:
    """The patched server with local origins only and one extra host name; DEBUG logs every
    request body that reaches an endpoint. Yields (port, log path)."""
    args = [
        "--model",
        str(demo_model),
        "--served-model-name",
        SERVED,
        "--allowed-origins",
        LOCAL_ORIGINS,
        "--allowed-hosts",
        "mymac.local",
        "--log-level",
        "DEBUG",
    ]
    with running_server(patched_runtime.python, args) as (base_url, log):
        yield urlsplit(base_url).port, log


@pytest.fixture(scope="module")
def keyed_server(patched_runtime: PatchedRuntime, demo_model: Path) -> Iterator[int]:
    """The patched server with local origins only and an API key. Yields its port."""
    args = ["--model", str(demo_model), "--served-model-name", SERVED]
    args += ["--allowed-origins", LOCAL_ORIGINS, "--api-key", KEY]
    with running_server(patched_runtime.python, args) as (base_url, _):
        yield urlsplit(base_url).port


def call(
    port: int,
    method: str,
    path: str,
    host: str | None,
    headers: dict[str, str] | None = None,
    body: dict | str | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """One request to 127.0.0.1:port with exactly this Host header (None: no Host header)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        connection.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        if host is not None:
            connection.putheader("Host", host)
        for name, value in (headers or {}).items():
            connection.putheader(name, value)
        data = None
        if body is not None or method == "POST":
            data = (body if isinstance(body, str) else json.dumps(body or CHAT)).encode()
            connection.putheader("Content-Length", str(len(data)))
        connection.endheaders(data)
        reply = connection.getresponse()
        return reply.status, {k.lower(): v for k, v in reply.getheaders()}, reply.read()
    finally:
        connection.close()


@pytest.mark.parametrize(
    "host",
    [
        "evil.example",
        "evil.example:{port}",
        "127.0.0.1.nip.io:{port}",  # a rebinding name that resolves to 127.0.0.1
        "localhost.evil.example:{port}",
        "mymac.local.evil.example",
        "10.0.0.7:{port}",  # an IP address, but not this server's: it listens on 127.0.0.1
    ],
)
def test_a_foreign_host_gets_403_on_every_endpoint(server: tuple[int, Path], host: str) -> None:
    port, _ = server
    host = host.format(port=port)
    for method, path in ENDPOINTS:
        status, headers, body = call(port, method, path, host)
        assert status == 403, (method, path, status, body)
        error = json.loads(body)["error"]
        assert error["code"] == "host_not_allowed"
        assert "--allowed-hosts" in error["message"] and "allowed_hosts" in error["message"]
        assert "access-control-allow-origin" not in headers


def test_the_server_own_names_are_answered(server: tuple[int, Path]) -> None:
    port, _ = server
    for host in (
        f"127.0.0.1:{port}",
        f"localhost:{port}",
        "LocalHost",
        f"localhost.:{port}",
        f"[::1]:{port}",
        f"127.0.0.2:{port}",
        f"mymac.local:{port}",  # --allowed-hosts
        None,  # HTTP/1.0 without a Host header: not a browser
    ):
        status, _, body = call(port, "GET", "/health", host)
        assert (status, json.loads(body)) == (200, {"status": "ok"}), host
    status, _, body = call(port, "GET", "/v1/models", f"mymac.local:{port}")
    assert status == 200 and json.loads(body)["data"][0]["id"] == SERVED


def test_refused_requests_never_reach_an_endpoint(server: tuple[int, Path]) -> None:
    """DEBUG logs each request body that reaches an endpoint: the refused ones are not there."""
    port, log = server
    body = dict(CHAT, messages=[{"role": "user", "content": "refused-marker-91c2"}])
    status, _, _ = call(port, "POST", "/v1/chat/completions", "evil.example", body=body)
    assert status == 403
    headers = {"Origin": "https://evil.example", "Content-Type": "text/plain"}
    status, _, _ = call(port, "POST", "/v1/chat/completions", f"127.0.0.1:{port}", headers, body)
    assert status == 403
    served = dict(CHAT, messages=[{"role": "user", "content": "served-marker-5d0e"}])
    assert call(port, "POST", "/v1/chat/completions", f"127.0.0.1:{port}", body=served)[0] == 200
    text = log.read_text()
    assert "served-marker-5d0e" in text
    assert "refused-marker-91c2" not in text
    assert "Refused POST /v1/chat/completions: Host 'evil.example'" in text


@pytest.mark.parametrize(
    "origin",
    [
        "https://evil.example",
        "http://localhost.evil.example:8000",
        "http://localhost:8000.evil.example",
        "https://localhost:5173",  # only http:// origins are allowed on this server
        "null",  # sandboxed iframes and file:// pages of any site
    ],
)
def test_a_foreign_origin_gets_no_allow_header(server: tuple[int, Path], origin: str) -> None:
    port, _ = server
    host = f"127.0.0.1:{port}"
    preflight = {
        "Origin": origin,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type",
    }
    simple = {"Origin": origin, "Content-Type": "text/plain"}
    for method, path, headers in (
        ("OPTIONS", "/v1/chat/completions", preflight),
        ("POST", "/v1/chat/completions", simple),
        ("POST", "/v1/messages?beta=true", simple),
        ("POST", "/v1/responses", simple),
        ("GET", "/v1/models", {"Origin": origin}),
        ("GET", "/health", {"Origin": origin}),
    ):
        status, reply_headers, body = call(port, method, path, host, headers)
        assert status == 403, (method, path, status)
        assert "access-control-allow-origin" not in reply_headers
        error = json.loads(body)["error"]
        assert error["code"] == "origin_not_allowed" and "allowed_origins" in error["message"]


@pytest.mark.parametrize(
    "origin",
    ["http://localhost:5173", "http://localhost", "http://127.0.0.1:8080", "http://[::1]:3000"],
)
def test_a_local_origin_gets_the_allow_header(server: tuple[int, Path], origin: str) -> None:
    port, _ = server
    host = f"127.0.0.1:{port}"
    preflight = {"Origin": origin, "Access-Control-Request-Method": "POST"}
    status, headers, _ = call(port, "OPTIONS", "/v1/chat/completions", host, preflight)
    assert status == 204
    assert headers["access-control-allow-origin"] == origin and headers["vary"] == "Origin"
    simple = {"Origin": origin, "Content-Type": "text/plain"}
    status, headers, body = call(port, "POST", "/v1/chat/completions", host, simple)
    assert status == 200 and json.loads(body)["model"] == SERVED
    assert headers["access-control-allow-origin"] == origin
    message = {"model": SERVED, "max_tokens": 2, "messages": CHAT["messages"]}
    status, headers, body = call(port, "POST", "/v1/messages", host, simple, message)
    assert status == 200 and json.loads(body)["type"] == "message"
    assert headers["access-control-allow-origin"] == origin


def test_a_local_page_that_sends_a_key_passes_its_preflight(keyed_server: int) -> None:
    """The Fetch standard lets "*" cover neither Authorization nor, with credentials,
    anything: the allowed headers name what the preflight asks for."""
    port = keyed_server
    host = f"127.0.0.1:{port}"
    origin = "http://localhost:5173"
    preflight = {
        "Origin": origin,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": CLIENT_HEADERS,
    }
    for path in ("/v1/chat/completions", "/v1/messages", "/v1/models"):
        status, headers, _ = call(port, "OPTIONS", path, host, preflight)
        assert status == 204, path  # a preflight carries no key: it is never refused for that
        assert headers["access-control-allow-origin"] == origin
        allowed = {name.strip() for name in headers["access-control-allow-headers"].split(",")}
        assert allowed == set(CLIENT_HEADERS.split(","))
    # The request the preflight was for, with the key, and without it
    keyed = {"Origin": origin, "Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    status, headers, body = call(port, "POST", "/v1/chat/completions", host, keyed)
    assert status == 200 and json.loads(body)["model"] == SERVED
    assert headers["access-control-allow-origin"] == origin
    status, headers, body = call(port, "POST", "/v1/chat/completions", host, {"Origin": origin})
    assert status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key"
    assert headers["access-control-allow-origin"] == origin  # the page can read why
    # A foreign page asking the same gets nothing
    foreign = dict(preflight, Origin="https://evil.example")
    status, headers, _ = call(port, "OPTIONS", "/v1/chat/completions", host, foreign)
    assert status == 403
    assert not {"access-control-allow-origin", "access-control-allow-headers"} & set(headers)


def test_the_openai_client_and_curl_to_localhost_keep_working(server: tuple[int, Path]) -> None:
    port, _ = server
    client = openai.OpenAI(
        base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120
    )
    answer = client.chat.completions.create(model=SERVED, messages=CHAT["messages"], max_tokens=2)
    assert answer.model == SERVED
    assert [m.id for m in client.models.list()] == [SERVED]
    # curl sends "Host: localhost:PORT" (and tries ::1 first, then 127.0.0.1)
    for path in ("/health", "/v1/models"):
        result = subprocess.run(
            ["curl", "-sS", "-w", "\n%{http_code}", f"http://localhost:{port}{path}"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines()[-1] == "200", result.stdout

"""A recording proxy between a coding agent and the server: it forwards every request as it
came and keeps what the agent sent (method, path, headers, JSON body) and what it got back
(status, the usage of the answer), so tests can assert on both and report the traffic."""

from __future__ import annotations

import http.client
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "upgrade", "host"}


@dataclass
class Exchange:
    """One request an agent sent, and the answer it got."""

    method: str
    path: str
    headers: dict[str, str]
    body: dict | None
    status: int = 0
    answer: bytes = b""
    usage: dict = field(default_factory=dict)


def answer_usage(answer: bytes) -> dict:
    """The usage of a JSON answer or of the last event of a stream that carries one."""
    found: dict = {}
    chunks = [answer] if answer.lstrip().startswith(b"{") else answer.split(b"\n")
    for chunk in chunks:
        text = chunk.decode(errors="replace").strip()
        if text.startswith("data: "):
            text = text[len("data: ") :]
        try:
            data = json.loads(text)
        except ValueError:
            continue
        if not isinstance(data, dict):
            continue
        for holder in (data, data.get("message"), data.get("response")):
            if isinstance(holder, dict) and isinstance(holder.get("usage"), dict):
                found = {**found, **holder["usage"]}
    return found


class Recorder:
    """The exchanges a proxy saw, in order (thread-safe)."""

    def __init__(self) -> None:
        self.exchanges: list[Exchange] = []
        self._lock = threading.Lock()

    def add(self, exchange: Exchange) -> None:
        with self._lock:
            self.exchanges.append(exchange)

    def posts(self, prefix: str) -> list[Exchange]:
        """The POSTs whose path starts with `prefix` (e.g. "/v1/messages")."""
        with self._lock:
            return [e for e in self.exchanges if e.method == "POST" and e.path.startswith(prefix)]

    def clear(self) -> None:
        with self._lock:
            self.exchanges.clear()


def _handler(upstream: str, recorder: Recorder) -> type[BaseHTTPRequestHandler]:
    target = urlsplit(upstream)

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

        def _forward(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            data = self.rfile.read(length) if length else b""
            headers = {k.lower(): v for k, v in self.headers.items()}
            try:
                body = json.loads(data) if data else None
            except ValueError:
                body = {"_raw": data.decode(errors="replace")}
            exchange = Exchange(self.command, self.path, headers, body)
            sent = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
            sent["Host"] = target.netloc
            connection = http.client.HTTPConnection(target.hostname, target.port, timeout=600)
            try:
                connection.request(self.command, self.path, body=data or None, headers=sent)
                reply = connection.getresponse()
                exchange.status = reply.status
                self.send_response(reply.status)
                for name, value in reply.getheaders():
                    if name.lower() not in HOP_BY_HOP | {"content-length"}:
                        self.send_header(name, value)
                self.send_header("Connection", "close")
                self.end_headers()
                answer = bytearray()
                while chunk := reply.read1(65536):
                    answer += chunk
                    self.wfile.write(chunk)
                    self.wfile.flush()
                exchange.answer = bytes(answer)
                exchange.usage = answer_usage(exchange.answer)
            finally:
                connection.close()
                recorder.add(exchange)

        do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_OPTIONS = _forward

    return Handler


@contextmanager
def recording_proxy(upstream: str) -> Iterator[tuple[str, Recorder]]:
    """A proxy on 127.0.0.1 (a free port) to `upstream`: yields (its base URL, recorder)."""
    recorder = Recorder()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(upstream, recorder))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", recorder
    finally:
        server.shutdown()
        server.server_close()


class _Refuser(BaseHTTPRequestHandler):
    """Answers every proxy request (CONNECT host:443, GET http://...) with 403, noting where
    it was meant to go."""

    attempts: list[str]

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _refuse(self) -> None:
        self.attempts.append(self.path if self.command == "CONNECT" else urlsplit(self.path).netloc)
        self.send_response(403)
        self.send_header("Content-Length", "0")
        self.send_header("Connection", "close")
        self.end_headers()

    do_CONNECT = do_GET = do_POST = do_PUT = do_HEAD = _refuse


@contextmanager
def refusing_proxy() -> Iterator[tuple[str, list[str]]]:
    """An HTTP(S) proxy on 127.0.0.1 that refuses everything: set as an agent's HTTPS_PROXY,
    it keeps the agent off the internet and yields (its URL, the hosts it tried to reach)."""
    attempts: list[str] = []
    handler = type("Refuser", (_Refuser,), {"attempts": attempts})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", attempts
    finally:
        server.shutdown()
        server.server_close()

"""Bursts of concurrent requests against a server: answered, rejected, dropped, latency.

    python -m mlx_local.service.loadtest --url http://127.0.0.1:8000
    python -m mlx_local.service.loadtest --model local-models/demo-tiny-qwen3 --backlog 5 128
    python -m mlx_local.service.loadtest --url ... --apis chat messages responses

With --url it loads a running server; with --model it starts the patched server (this
Python's mlx_lm: run it with .venv/bin/python) once per --backlog value, with
`--listen-backlog N` and a small prompt cache, and prints the runs side by side: requests
sent, answered 200 with a completion, answered 4xx with a JSON error (the malformed ones),
dropped (reset, refused, timed out), wrong answers, latency of the valid ones, /health after,
peak memory and the largest prompt cache the server logged. --apis takes the requests in
turn through chat completions, the Anthropic Messages API and the OpenAI Responses API.
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import statistics
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..bench.server import BenchServer

SHARED_PREFIX = (
    "You are a careful coding assistant working in a large repository. Answer briefly, name "
    "the files you would change, and never invent APIs. The project keeps a patch queue for "
    "a local language model server, a service that runs it, and tests that start real "
    "servers on the loopback interface. "
) * 3

# The APIs a load can use: the path each posts to.
PATHS = {"chat": "/v1/chat/completions", "messages": "/v1/messages", "responses": "/v1/responses"}

# Bodies a server must refuse with a 4xx JSON error (bytes: sent as they are), per API.
MALFORMED: tuple[bytes, ...] = (
    b'{"messages": [{"role": "user", "content": "hi"}',  # bad JSON
    b'{"max_tokens": 4}',  # no messages
    b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": "4"}',  # wrong type
    b'{"messages": "hi", "max_tokens": 4}',  # messages not a list
    b'{"messages": [{"role": "user", "content": "hi"}], "stop": 5, "max_tokens": 4}',
)
MALFORMED_BY_API: dict[str, tuple[bytes, ...]] = {
    "chat": MALFORMED,
    "messages": (
        b'{"max_tokens": 4, "messages": [{"role": "user", "content": "hi"}',
        b'{"max_tokens": 4, "messages": "hi"}',
        b'{"max_tokens": "4", "messages": [{"role": "user", "content": "hi"}]}',
        b'{"max_tokens": 4, "messages": [], "stop_sequences": 5}',
    ),
    "responses": (
        b'{"input": [{"role": "user", "content": "hi"}',
        b'{"input": 5}',
        b'{"input": "hi", "max_output_tokens": "4"}',
    ),
}

REQUEST_TIMEOUT = 300.0
PROMPT_CACHE_LINE = re.compile(r"Prompt Cache: (\d+) sequences")


@dataclass(frozen=True)
class Request:
    """One request of a load: its body, whether it is valid, whether it streams, its API."""

    body: bytes
    valid: bool
    stream: bool
    api: str = "chat"


@dataclass(frozen=True)
class Outcome:
    """What came back: status (None if the connection failed), whether it was right, time."""

    request: Request
    status: int | None
    correct: bool
    seconds: float
    detail: str


@dataclass(frozen=True)
class Report:
    """The outcomes of one load, counted."""

    outcomes: list[Outcome]

    @property
    def sent(self) -> int:
        return len(self.outcomes)

    @property
    def answered_200(self) -> int:
        return sum(o.status == 200 and o.correct for o in self.outcomes)

    @property
    def answered_4xx(self) -> int:
        return sum(o.correct and 400 <= (o.status or 0) < 500 for o in self.outcomes)

    @property
    def dropped(self) -> int:
        """Connections reset, refused or timed out: no HTTP answer at all."""
        return sum(o.status is None for o in self.outcomes)

    @property
    def wrong(self) -> list[Outcome]:
        """Answers that are not what the request deserved (a 500, a 200 to a bad body...)."""
        return [o for o in self.outcomes if o.status is not None and not o.correct]

    def latency(self, quantile: float) -> float | None:
        """Seconds to the full answer of valid requests answered 200, at `quantile`."""
        times = sorted(o.seconds for o in self.outcomes if o.request.valid and o.correct)
        if not times:
            return None
        if len(times) == 1:
            return times[0]
        return statistics.quantiles(times, n=100, method="inclusive")[round(quantile * 100) - 1]


def _payload(api: str, question: str, max_tokens: int, stream: bool) -> dict:
    """A valid request of `api` with the shared system prompt and `question`."""
    if api == "responses":
        return {
            "instructions": SHARED_PREFIX,
            "input": question,
            "max_output_tokens": max_tokens,
            "stream": stream,
        }
    payload = {
        "messages": [{"role": "user", "content": question}],
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": stream,
    }
    if api == "messages":
        return {"system": SHARED_PREFIX, **payload}
    payload["messages"].insert(0, {"role": "system", "content": SHARED_PREFIX})
    return payload


def make_requests(
    count: int, malformed_every: int = 10, max_tokens: int = 8, apis: Sequence[str] = ("chat",)
) -> list[Request]:
    """`count` requests sharing a system prompt, alternately streaming, through `apis` in
    turn; every `malformed_every`-th one is malformed (cycling through its API's bodies)."""
    requests = []
    for i in range(count):
        api = apis[i % len(apis)]
        if malformed_every and i % malformed_every == malformed_every - 1:
            bad = MALFORMED_BY_API[api]
            body = bad[(i // malformed_every) % len(bad)]
            requests.append(Request(body, valid=False, stream=False, api=api))
            continue
        stream = i % 2 == 0
        question = f"Request {i}: which file holds the config?"
        payload = _payload(api, question, max_tokens, stream)
        requests.append(Request(json.dumps(payload).encode(), True, stream, api))
    return requests


def _events(body: bytes) -> list[dict]:
    """The data of each server-sent event of a stream."""
    lines = body.decode().splitlines()
    return [json.loads(line[6:]) for line in lines if line.startswith("data: ")]


def _completed(request: Request, body: bytes) -> bool:
    """Whether a 200 `body` holds a finished answer (a chat stream: chunks, then [DONE]; a
    Messages stream: message_stop; a Responses stream: response.completed/incomplete)."""
    if request.api == "messages":
        if request.stream:
            events = _events(body)
            return events[-1]["type"] == "message_stop" and any(
                e["type"] == "message_delta" and e["delta"]["stop_reason"] for e in events
            )
        message = json.loads(body)
        return message["type"] == "message" and bool(message["stop_reason"])
    if request.api == "responses":
        done = ("completed", "incomplete")
        if request.stream:
            last = _events(body)[-1]
            return last["type"] in ("response.completed", "response.incomplete") and (
                last["response"]["status"] in done
            )
        return json.loads(body)["status"] in done
    if request.stream:
        events = [line[6:] for line in body.decode().splitlines() if line.startswith("data: ")]
        if not events or events[-1] != "[DONE]":
            return False
        chunks = [json.loads(event) for event in events[:-1]]
        return any(c["choices"] and c["choices"][0].get("finish_reason") for c in chunks)
    choice = json.loads(body)["choices"][0]
    # A thinking model cut by max_tokens may have said only its thought (no content yet).
    said = [choice["message"].get(key) for key in ("content", "reasoning")]
    return any(isinstance(text, str) for text in said) and bool(choice["finish_reason"])


def _judge(request: Request, status: int, body: bytes) -> tuple[bool, str]:
    """Whether `body` with `status` is the right answer to `request`, and what came if not."""
    detail = f"{status} {body[:120]!r}"
    if not request.valid:
        try:
            error = json.loads(body).get("error")
        except (ValueError, AttributeError):
            error = None
        return 400 <= status < 500 and bool(error), detail
    try:
        ok = status == 200 and _completed(request, body)
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        ok = False
    return ok, "" if ok else detail


def send(url: str, request: Request, timeout: float = REQUEST_TIMEOUT) -> Outcome:
    """POST one request on a new connection and judge the answer."""
    parts = urllib.parse.urlsplit(url)
    start = time.monotonic()
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        connection.request(
            "POST",
            PATHS[request.api],
            body=request.body,
            headers={"Content-Type": "application/json"},
        )
        response = connection.getresponse()
        body = response.read()
    except (OSError, http.client.HTTPException) as error:
        return Outcome(request, None, False, time.monotonic() - start, type(error).__name__)
    finally:
        connection.close()
    correct, detail = _judge(request, response.status, body)
    return Outcome(request, response.status, correct, time.monotonic() - start, detail)


def run_load(url: str, requests: Sequence[Request], concurrency: int) -> Report:
    """Send `requests` from `concurrency` threads that start together, each taking the next
    request when its previous one is answered."""
    pending = list(reversed(requests))
    lock = threading.Lock()
    start = threading.Barrier(concurrency)
    outcomes: list[Outcome] = []

    def worker() -> None:
        start.wait()
        while True:
            with lock:
                if not pending:
                    return
                request = pending.pop()
            outcome = send(url, request)
            with lock:
                outcomes.append(outcome)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return Report(outcomes)


def healthy(url: str) -> bool:
    """Whether GET /health answers 200."""
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        connection.request("GET", "/health")
        return connection.getresponse().status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        connection.close()


def max_prompt_cache_sequences(log_text: str) -> int | None:
    """The largest prompt cache size (entries) the server logged, or None if it logged none."""
    counts = [int(n) for n in PROMPT_CACHE_LINE.findall(log_text)]
    return max(counts) if counts else None


# The loads of one run: a burst all at once, then a longer run at a steady concurrency.
PHASES: tuple[tuple[str, int, int], ...] = (("50 at once", 50, 50), ("200 by 20", 200, 20))


def run_phases(
    url: str, max_tokens: int = 8, apis: Sequence[str] = ("chat",)
) -> list[tuple[str, Report, bool]]:
    """Each phase of PHASES against `url`: (name, report, /health OK afterwards)."""
    results = []
    for name, count, concurrency in PHASES:
        requests = make_requests(count, max_tokens=max_tokens, apis=apis)
        report = run_load(url, requests, concurrency)
        results.append((name, report, healthy(url)))
    return results


@contextmanager
def patched_server(
    python: Path, model: Path, backlog: int, extra: Sequence[str], log_dir: Path
) -> Iterator[BenchServer]:
    """The patched server with `--listen-backlog backlog`, stopped afterwards."""
    args = ["--listen-backlog", str(backlog), *extra]
    with BenchServer(python, model, args, log_dir / f"server-backlog-{backlog}.log") as server:
        yield server


def _fmt(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.2f}"


def table(rows: list[tuple[str, str, Report, bool, str]]) -> str:
    """Rows (server, phase, report, healthy after, memory) as a plain text table."""
    header = ("server", "phase", "sent", "200", "4xx", "dropped", "wrong", "p50 s", "p95 s")
    header += ("health", "memory")
    lines = [header]
    for server, phase, report, ok, memory in rows:
        lines.append(
            (
                server, phase, str(report.sent), str(report.answered_200),
                str(report.answered_4xx), str(report.dropped), str(len(report.wrong)),
                _fmt(report.latency(0.5)), _fmt(report.latency(0.95)),
                "ok" if ok else "FAILED", memory,
            )
        )  # fmt: skip
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    rows_text = ("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in lines)
    return "\n".join(rows_text)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mlx_local.service.loadtest")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="a running server, e.g. http://127.0.0.1:8000")
    target.add_argument("--model", type=Path, help="start the patched server with this model")
    parser.add_argument("--backlog", type=int, nargs="+", default=[5, 128])
    parser.add_argument("--prompt-cache-size", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument(
        "--apis", nargs="+", choices=list(PATHS), default=["chat"], help="APIs used in turn"
    )
    args = parser.parse_args(argv)

    if args.url:
        results = run_phases(args.url, args.max_tokens, args.apis)
        print(table([(args.url, name, rep, ok, "-") for name, rep, ok in results]))
        return 0 if all(r.dropped == 0 and not r.wrong and ok for _, r, ok in results) else 1

    rows = []
    extra = ["--prompt-cache-size", str(args.prompt_cache_size)]
    with tempfile.TemporaryDirectory(prefix="mlx-loadtest-") as tmp:
        for backlog in args.backlog:
            with patched_server(Path(sys.executable), args.model, backlog, extra, Path(tmp)) as s:
                results = run_phases(s.base_url, args.max_tokens, args.apis)
                cached = max_prompt_cache_sequences(s.log_path.read_text(errors="replace"))
                rss = s.peak_rss()
                memory = f"peak {rss / 2**20:.0f} MiB, cache <= {cached}/{args.prompt_cache_size}"
                for name, report, ok in results:
                    rows.append((f"backlog {backlog}", name, report, ok, memory))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

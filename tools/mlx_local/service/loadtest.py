"""Bursts of concurrent chat requests against a server: answered, rejected, dropped, latency.

    python -m mlx_local.service.loadtest --url http://127.0.0.1:8000
    python -m mlx_local.service.loadtest --model local-models/demo-tiny-qwen3 --backlog 5 128

With --url it loads a running server; with --model it starts the patched server (this
Python's mlx_lm: run it with .venv/bin/python) once per --backlog value, with
`--listen-backlog N` and a small prompt cache, and prints the runs side by side: requests
sent, answered 200 with a completion, answered 4xx with a JSON error (the malformed ones),
dropped (reset, refused, timed out), wrong answers, latency of the valid ones, /health after,
peak memory and the largest prompt cache the server logged.
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

# Bodies a server must refuse with a 4xx JSON error (bytes: sent as they are).
MALFORMED: tuple[bytes, ...] = (
    b'{"messages": [{"role": "user", "content": "hi"}',  # bad JSON
    b'{"max_tokens": 4}',  # no messages
    b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": "4"}',  # wrong type
    b'{"messages": "hi", "max_tokens": 4}',  # messages not a list
    b'{"messages": [{"role": "user", "content": "hi"}], "stop": 5, "max_tokens": 4}',
)

REQUEST_TIMEOUT = 300.0
PROMPT_CACHE_LINE = re.compile(r"Prompt Cache: (\d+) sequences")


@dataclass(frozen=True)
class Request:
    """One request of a load: its body, whether it is valid, whether it streams."""

    body: bytes
    valid: bool
    stream: bool


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


def make_requests(count: int, malformed_every: int = 10, max_tokens: int = 8) -> list[Request]:
    """`count` chat requests sharing a system prompt, alternately streaming; every
    `malformed_every`-th one is malformed (cycling through MALFORMED)."""
    requests = []
    for i in range(count):
        if malformed_every and i % malformed_every == malformed_every - 1:
            body = MALFORMED[(i // malformed_every) % len(MALFORMED)]
            requests.append(Request(body, valid=False, stream=False))
            continue
        stream = i % 2 == 0
        payload = {
            "messages": [
                {"role": "system", "content": SHARED_PREFIX},
                {"role": "user", "content": f"Request {i}: which file holds the config?"},
            ],
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "stream": stream,
        }
        requests.append(Request(json.dumps(payload).encode(), valid=True, stream=stream))
    return requests


def _completed(request: Request, body: bytes) -> bool:
    """Whether a 200 `body` holds a finished completion (a stream: chunks, then [DONE])."""
    if request.stream:
        events = [line[6:] for line in body.decode().splitlines() if line.startswith("data: ")]
        if not events or events[-1] != "[DONE]":
            return False
        chunks = [json.loads(event) for event in events[:-1]]
        return any(c["choices"] and c["choices"][0].get("finish_reason") for c in chunks)
    choice = json.loads(body)["choices"][0]
    return isinstance(choice["message"].get("content"), str) and bool(choice["finish_reason"])


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
    """POST one chat request on a new connection and judge the answer."""
    parts = urllib.parse.urlsplit(url)
    start = time.monotonic()
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        connection.request(
            "POST",
            "/v1/chat/completions",
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


def run_phases(url: str, max_tokens: int = 8) -> list[tuple[str, Report, bool]]:
    """Each phase of PHASES against `url`: (name, report, /health OK afterwards)."""
    results = []
    for name, count, concurrency in PHASES:
        report = run_load(url, make_requests(count, max_tokens=max_tokens), concurrency)
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
    args = parser.parse_args(argv)

    if args.url:
        results = run_phases(args.url, args.max_tokens)
        print(table([(args.url, name, rep, ok, "-") for name, rep, ok in results]))
        return 0 if all(r.dropped == 0 and not r.wrong and ok for _, r, ok in results) else 1

    rows = []
    extra = ["--prompt-cache-size", str(args.prompt_cache_size)]
    with tempfile.TemporaryDirectory(prefix="mlx-loadtest-") as tmp:
        for backlog in args.backlog:
            with patched_server(Path(sys.executable), args.model, backlog, extra, Path(tmp)) as s:
                results = run_phases(s.base_url, args.max_tokens)
                cached = max_prompt_cache_sequences(s.log_path.read_text(errors="replace"))
                rss = s.peak_rss()
                memory = f"peak {rss / 2**20:.0f} MiB, cache <= {cached}/{args.prompt_cache_size}"
                for name, report, ok in results:
                    rows.append((f"backlog {backlog}", name, report, ok, memory))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Bursts of concurrent requests on the real patched server (issue 11, part 2; issue 19).

Fifty requests at once, then 200 twenty at a time: chat completions, the Anthropic Messages
API and the OpenAI Responses API in turn, mixed streaming and not, a shared system prompt, a
few malformed bodies. Every valid request gets a 200 with a completion, every
malformed one a 4xx JSON error, none is dropped, and the prompt cache stays within its limits
(entries in memory from the server's log, bytes on disk from the folder).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from mlx_local.service import loadtest
from tests.conftest import PatchedRuntime
from tests.helpers import running_server

pytestmark = pytest.mark.slow

CACHE_ENTRIES = 4
DISK_BUDGET = 2 * 2**20


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def test_bursts_are_answered_within_the_cache_limits(
    patched_runtime: PatchedRuntime, demo_model: Path, tmp_path: Path
) -> None:
    cache_dir = tmp_path / "prompt-cache"
    args = [
        "--model", str(demo_model), "--prompt-cache-size", str(CACHE_ENTRIES),
        "--prompt-cache-dir", str(cache_dir), "--prompt-cache-dir-bytes", str(DISK_BUDGET),
    ]  # fmt: skip
    with running_server(patched_runtime.python, args) as (url, log_path):
        for _, count, concurrency in loadtest.PHASES:
            requests = loadtest.make_requests(count, apis=tuple(loadtest.PATHS))
            valid = sum(r.valid for r in requests)
            report = loadtest.run_load(url, requests, concurrency)
            print(f"\n{count} by {concurrency}: {report.answered_200} x 200, "
                  f"{report.answered_4xx} x 4xx, {report.dropped} dropped, "
                  f"p50 {report.latency(0.5):.2f} s, p95 {report.latency(0.95):.2f} s")  # fmt: skip
            assert report.dropped == 0, [o.detail for o in report.outcomes if o.status is None]
            assert not report.wrong, [o.detail for o in report.wrong]
            assert (report.answered_200, report.answered_4xx) == (valid, count - valid)
            assert 0 < count - valid < valid
            # Chat completions, the Messages and the Responses API, each answered and refused
            for outcome in (200, 400):
                apis = {o.request.api for o in report.outcomes if o.correct and o.status == outcome}
                assert apis == set(loadtest.PATHS), (outcome, apis)
            assert loadtest.healthy(url)
        log = log_path.read_text(errors="replace")
    # The in-memory cache filled up to its limit and never held more.
    assert loadtest.max_prompt_cache_sequences(log) == CACHE_ENTRIES
    # Entries that left memory went to disk, within the byte budget.
    assert 0 < folder_bytes(cache_dir) <= DISK_BUDGET


@pytest.mark.skipif(sys.platform != "linux", reason="how a full accept queue fails is Linux's")
def test_a_backlog_of_5_drops_part_of_a_burst(
    patched_runtime: PatchedRuntime, demo_model: Path
) -> None:
    """The same burst against socketserver's old backlog loses connections: the default
    above is what makes the difference."""
    args = ["--model", str(demo_model), "--listen-backlog", "5"]
    with running_server(patched_runtime.python, args) as (url, _):
        report = loadtest.run_load(url, loadtest.make_requests(50), 50)
        assert loadtest.healthy(url)
    print(f"\nbacklog 5: {report.dropped} of 50 dropped")
    assert report.dropped > 0
    assert {o.detail for o in report.outcomes if o.status is None} <= {
        "ConnectionResetError",
        "ConnectionRefusedError",
        "TimeoutError",
    }

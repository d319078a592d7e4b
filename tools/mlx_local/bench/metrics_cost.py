"""What GET /metrics (patch 0011) costs in decode speed, measured A/B/A in one run.

A is the patched server with a scraper reading /metrics every second; B is the same
checkout with the metrics patch taken out (its commit's diff reversed on a copy of the
files), imported by the same interpreter through PYTHONPATH. Both serve the same model at
the same time; each round streams one request to A, one to B, one to A again, and B's
decode speed is compared with the mean of the two A requests around it. A1/A2 shows the
noise of the machine.

    python -m mlx_local.bench_metrics [--rounds 24] [--tokens 256] [--model DIR]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .. import project
from ..errors import UserError
from ..repo import checkout
from .model import ensure_model
from .prompts import end_of_text_ids
from .runtime import imported_from, tree_without_patch
from .server import BenchServer

METRICS_FILE = "mlx_lm/server_metrics.py"
SCRAPE_EVERY = 1.0


class Scraper(threading.Thread):
    """GET /metrics now and every SCRAPE_EVERY seconds until stopped; counts the answers."""

    def __init__(self, base_url: str) -> None:
        super().__init__(daemon=True)
        self.url = f"{base_url}/metrics"
        self.done = threading.Event()
        self.ok = 0
        self.failed = 0
        self.seconds: list[float] = []

    def run(self) -> None:
        while True:
            start = time.perf_counter()
            try:
                with urllib.request.urlopen(self.url, timeout=10) as reply:
                    reply.read()
                self.ok += 1
                self.seconds.append(time.perf_counter() - start)
            except OSError:
                self.failed += 1
            if self.done.wait(SCRAPE_EVERY):
                return

    def stop(self) -> None:
        self.done.set()
        self.join()


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a live process so far (Linux /proc), else None."""
    stat = Path(f"/proc/{pid}/stat")
    if not stat.exists():
        return None
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Run:
    """One request: client-side decode speed, and the server's CPU time per token."""

    tps: float
    cpu_ms_per_token: float | None


def run_once(server: BenchServer, messages: list[dict], tokens: int, bias: dict) -> Run:
    """Stream one request that decodes `tokens` tokens; time it and the server's CPU."""
    pid = server.process.pid
    cpu_before = cpu_seconds(pid)
    reply = server.chat(messages, tokens, bias)
    cpu_after = cpu_seconds(pid)
    if reply.decode_tps is None or not reply.completion_tokens:
        raise UserError(f"the server on port {server.port} decoded fewer than 2 tokens")
    cpu = None
    if cpu_before is not None and cpu_after is not None:
        cpu = 1000 * (cpu_after - cpu_before) / reply.completion_tokens
    return Run(reply.decode_tps, cpu)


def measure(python: Path, repo: Path, model: Path, rounds: int, tokens: int) -> dict:
    """Run A (patched, scraped) and B (no metrics patch) side by side; per-round figures."""
    bias = {i: -100.0 for i in end_of_text_ids(model)}
    messages = [{"role": "user", "content": "Write a long story about the sea."}]
    with tempfile.TemporaryDirectory(prefix="bench-metrics-") as tmp:
        tree = tree_without_patch(repo, Path(tmp) / "tree", METRICS_FILE)
        env_b = {"PYTHONPATH": str(tree)}
        if imported_from(python, env_b).resolve() != tree.resolve():
            raise UserError(f"with PYTHONPATH={tree}, {python} does not import mlx_lm from it")
        logs = Path(tmp)
        with (
            BenchServer(python, model, [], logs / "a.log") as a,
            BenchServer(python, model, [], logs / "b.log", env_b) as b,
        ):
            for server in (a, b):  # warm up: load, compile, fill the prompt cache
                run_once(server, messages, 16, bias)
            scraper = Scraper(a.base_url)
            scraper.start()
            try:
                runs = [
                    [run_once(s, messages, tokens, bias) for s in (a, b, a)] for _ in range(rounds)
                ]
            finally:
                scraper.stop()
            has_metrics = _answers(b.base_url + "/metrics")
    if scraper.failed or not scraper.ok:
        raise UserError(f"scraping A's /metrics failed {scraper.failed} times")
    if has_metrics:
        raise UserError("B answers /metrics: the metrics patch was not taken out")
    return {
        "rounds": runs,
        "scrapes": scraper.ok,
        "scrape_ms_median": 1000 * statistics.median(scraper.seconds),
    }


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=10):
            return True
    except OSError:
        return False


def median_interval(values: list[float], level: float = 0.95) -> tuple[float, float]:
    """A bootstrap confidence interval of the median (fixed seed: the same input, the same
    interval)."""
    rng = random.Random(0)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(2000))
    tail = int(len(medians) * (1 - level) / 2)
    return medians[tail], medians[-tail - 1]


def _ratios(rounds: list[list[Run]], figure: str) -> tuple[list[float], list[float]]:
    """Per round: mean of the two A runs over B, and A1 over A2 (the noise)."""
    a_over_b, noise = [], []
    for a1, b, a2 in ((getattr(r, figure) for r in runs) for runs in rounds):
        if None in (a1, b, a2) or not (b and a2):
            continue
        a_over_b.append((a1 + a2) / 2 / b)
        noise.append(a1 / a2)
    return a_over_b, noise


def _summary(name: str, a_over_b: list[float], noise: list[float]) -> list[str]:
    if not a_over_b:
        return [f"{name}: not measured on this system"]
    low, high = median_interval(a_over_b)
    return [
        f"{name} A/B: median {statistics.median(a_over_b):.3f}, 95% interval "
        f"{low:.3f}..{high:.3f} (min {min(a_over_b):.3f}, max {max(a_over_b):.3f})",
        f"{name} A1/A2 (noise between the two A runs): median {statistics.median(noise):.3f} "
        f"(min {min(noise):.3f}, max {max(noise):.3f})",
    ]


def report(result: dict, tokens: int) -> str:
    """The per-round figures and the ratios, as text."""
    rounds: list[list[Run]] = result["rounds"]
    lines = [
        f"A: the metrics patch, /metrics scraped every {SCRAPE_EVERY:g}s; "
        f"B: without the metrics patch. {tokens} tokens a request.",
        f"{'round':>5}  {'decode tok/s (client)':^26}  {'server CPU ms/token':^26}",
        f"{'':>5}  {'A1':>8}{'B':>9}{'A2':>9}  {'A1':>8}{'B':>9}{'A2':>9}",
    ]
    for i, runs in enumerate(rounds, 1):
        tps = "".join(f"{r.tps:>9.1f}" for r in runs)
        cpu = "".join(
            f"{r.cpu_ms_per_token:>9.2f}" if r.cpu_ms_per_token is not None else f"{'-':>9}"
            for r in runs
        )
        lines.append(f"{i:>5}  {tps[1:]}  {cpu[1:]}")
    a_tps = [r.tps for runs in rounds for r in (runs[0], runs[2])]
    b_tps = [runs[1].tps for runs in rounds]
    lines += [
        f"median decode: A {statistics.median(a_tps):.1f} tok/s, "
        f"B {statistics.median(b_tps):.1f} tok/s",
        *_summary("decode tok/s", *_ratios(rounds, "tps")),
        *_summary("server CPU per token", *_ratios(rounds, "cpu_ms_per_token")),
        f"scrapes of A: {result['scrapes']}, median {result['scrape_ms_median']:.1f} ms each",
    ]
    return "\n".join(lines)


def main() -> None:
    """Measure and print."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=24, help="A/B/A rounds (default 24)")
    parser.add_argument("--tokens", type=int, default=256, help="tokens decoded a request")
    parser.add_argument("--model", type=Path, help="model folder (default: the demo model)")
    args = parser.parse_args()
    proj = project.current()
    repo, _ = checkout.require_checkout(proj)
    model = args.model or ensure_model(proj.models_dir, quick=True)
    if args.rounds < 1 or args.tokens < 2:
        raise SystemExit("--rounds must be at least 1 and --tokens at least 2")
    try:
        result = measure(project.runtime_python(), repo, model.resolve(), args.rounds, args.tokens)
    except UserError as error:
        raise SystemExit(f"error: {error}") from None
    print(report(result, args.tokens))


if __name__ == "__main__":
    main()

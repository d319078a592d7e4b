"""Benchmark: does writing a large prompt cache entry to disk slow down the next request?

One run serves a model with a wide KV cache three times: without the disk tier (A), with
`--prompt-cache-dir` (B), without it again (A). Each round sends a new conversation, whose
cache (about 100-200 MB) is the entry B writes in the background, and right after it a
short request, timed: it runs while B writes. Prints the median latencies of the short
request and the ratio B / A, measured side by side.

    .venv/bin/python -m mlx_local.bench.disk_write [--rounds N] [--chars N]

The model is the demo model's tokenizer with random weights in a shape whose KV cache is
large for its compute (hidden size 64; 24 layers of 32 KV heads of 128 dimensions: 768 KB
a token in float32).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from ..errors import UserError
from ..models.demo_model import build_demo_model, corpus_text, random_weights
from ..server_help import server_options
from .server import BenchServer

WIDE_KV = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 24,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "head_dim": 128,
    "torch_dtype": "float32",
}
SAVED = re.compile(
    r"Prompt cache disk: saved (\d+) tokens to \S+ \((?:[^)]*, )?(\d+) bytes in ([\d.]+) s\)"
)
SHORT = "Hello, how are"


def build_wide_kv_model(dest: Path) -> Path:
    """The demo model with the `WIDE_KV` shape (random float32 weights: float16 matmuls
    are slow on a CPU)."""
    build_demo_model(dest, force=True)
    config = json.loads((dest / "config.json").read_text()) | WIDE_KV
    (dest / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    weights = {k: v.astype(np.float32) for k, v in random_weights(config).items()}
    save_file(weights, str(dest / "model.safetensors"), {"format": "pt"})
    return dest


def _post(url: str, path: str, body: dict) -> tuple[float, dict]:
    request = urllib.request.Request(
        f"{url}{path}", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=600) as response:
        reply = json.loads(response.read())
    return time.perf_counter() - start, reply


def _short(url: str) -> float:
    """A short plain completion (no chat template: it shares no prefix with the chats)."""
    body = {"prompt": SHORT, "max_tokens": 4, "temperature": 0.0}
    return _post(url, "/v1/completions", body)[0]


@contextmanager
def _server(python: str, model: Path, args: Sequence[str], log: Path) -> Iterator[str]:
    with BenchServer(Path(python), model, args, log) as server:
        yield server.base_url


def _wait_saved(log: Path, min_tokens: int, seen: int, timeout: float = 300) -> int:
    """Wait until a save of `min_tokens`+ tokens appears after the first `seen` saves."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        saves = SAVED.findall(log.read_text())
        if any(int(n) >= min_tokens for n, _, _ in saves[seen:]):
            return len(saves)
        time.sleep(0.1)
    raise UserError(f"the disk tier did not save the entry in {timeout:.0f} s; see {log}")


def run_phase(
    python: str, model: Path, disk: Path | None, rounds: int, chars: int, log: Path
) -> dict:
    """Serve once; per round a new conversation, then right away a short request (timed)."""
    args = ["--prompt-cache-dir", str(disk)] if disk else []
    text = corpus_text()
    latencies, prompt_tokens = [], []
    with _server(python, model, args, log) as url:
        _short(url)  # warm up
        seen = 0
        for i in range(rounds):
            start = (i * 997) % max(1, len(text) - chars)
            messages = [
                {"role": "system", "content": f"Round {i}: {os.urandom(4).hex()}"},
                {"role": "user", "content": text[start : start + chars]},
            ]
            body = {"messages": messages, "max_tokens": 4, "temperature": 0.0}
            _, reply = _post(url, "/v1/chat/completions", body)
            latencies.append(_short(url))
            prompt_tokens.append(reply["usage"]["prompt_tokens"])
            if disk:  # let the writer finish before the next round starts
                seen = _wait_saved(log, prompt_tokens[-1], seen)
    saves = [(int(n), int(b), float(s)) for n, b, s in SAVED.findall(log.read_text())]
    return {"latencies": latencies, "prompt_tokens": prompt_tokens, "saves": saves}


def main(argv: Sequence[str] | None = None) -> int:
    """Run A (disk tier off), B (on), A again; print the next request's latency ratio B / A."""
    parser = argparse.ArgumentParser(
        prog="python -m mlx_local.bench.disk_write",
        description=__doc__.split("\n")[0],
    )
    parser.add_argument("--rounds", type=int, default=6, help="rounds per phase (default: 6)")
    parser.add_argument(
        "--chars", type=int, default=250, help="characters of each conversation (default: 250)"
    )
    parser.add_argument("--python", default=sys.executable, help="python with the patched mlx_lm")
    args = parser.parse_args(argv)
    if "--prompt-cache-dir" not in server_options(Path(args.python)):
        raise UserError(f"{args.python}: its mlx_lm.server has no --prompt-cache-dir (patch 0005)")

    with tempfile.TemporaryDirectory(prefix="bench-disk-write-") as tmp:
        root = Path(tmp)
        model = build_wide_kv_model(root / "wide-kv")
        phases = {}
        for name, disk in (("A1", None), ("B", root / "prompt-cache"), ("A2", None)):
            phases[name] = run_phase(
                args.python, model, disk, args.rounds, args.chars, root / f"{name}.log"
            )
            shown = [round(x, 3) for x in phases[name]["latencies"]]
            print(f"{name}: next request {shown} s", flush=True)

    a = phases["A1"]["latencies"] + phases["A2"]["latencies"]
    b = phases["B"]["latencies"]
    big = [s for s in phases["B"]["saves"] if s[0] >= min(phases["B"]["prompt_tokens"])]
    print(f"conversations: {statistics.median(phases['B']['prompt_tokens'])} tokens (median)")
    if big:
        size = statistics.median(s[1] for s in big) / 1e6
        seconds = statistics.median(s[2] for s in big)
        print(f"entries written by B: {len(big)}, median {size:.0f} MB in {seconds:.2f} s")
    a1 = statistics.median(phases["A1"]["latencies"])
    a2 = statistics.median(phases["A2"]["latencies"])
    print(f"next request, median: A {statistics.median(a):.3f} s (A1 {a1:.3f}, A2 {a2:.3f})")
    print(f"                      B {statistics.median(b):.3f} s")
    print(f"ratio B / A: {statistics.median(b) / statistics.median(a):.3f}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as error:
        sys.exit(f"bench.disk_write: {error}")

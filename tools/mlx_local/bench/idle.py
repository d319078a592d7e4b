"""Benchmark: what `--idle-unload` gives back, and what the first turn after a wake-up costs.

    python -m mlx_local.bench.idle [--prefix TOKENS] [--idle SECONDS]

One run, two models, real servers:

- memory and load rate, on a wide demo variant (float32 weights of about 240 MB, so that
  they stand out from the runtime): the RSS and mlx's memory of a server that loaded
  nothing, of the server with the model loaded, and of the same process once idle; the
  time a reload takes with the weights in the OS file cache and with that file evicted
  from it first (posix_fadvise DONTNEED: meant to read from disk; a VM's host may still
  cache it);
- the next turn's time to first token, on the bench model (bench-qwen3, a prefix of
  --prefix tokens): the same turn warm in memory, after a wake-up (reload + the prefix
  from the disk tier + only the new tokens), and cold (reload + the whole prompt), each
  split into the load and the rest (prefill).

- what the option costs while the model is loaded (on Linux it also holds glibc's
  malloc thresholds fixed, so that freed memory goes back): a new prompt's prefill and
  the decode rate on the bench model, servers with and without ``--idle-unload`` (an
  hour, so that nothing unloads) started in turn, --rounds times each.

From the load rate measured here it prints an estimate for a 60 GB model (an estimate:
a Mac's SSD and unified memory are not this machine).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..models.demo_variant import build_variant
from ..processes import anon_rss, free_port, settled_rss, terminate
from ..server_help import server_options
from ..service.metrics import parse
from ..service.process import wait_healthy
from .model import build_bench_model
from .prompts import PromptMaker, end_of_text_ids
from .server import Reply, stream_request

WIDE = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 4,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
}
ANSWER_TOKENS = 16
DECODE_TOKENS = 64
LARGE_MODEL_BYTES = 60e9


@dataclass
class Server:
    """One running server: its process, base URL and port."""

    process: subprocess.Popen
    url: str
    port: int

    def metrics(self) -> dict[str, float | str]:
        """The unlabelled samples of /metrics, and the model's state as "state"."""
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=60) as reply:
            samples = parse(reply.read().decode())
        flat: dict[str, float | str] = {n: v for (n, labels), v in samples.items() if not labels}
        for (name, labels), value in samples.items():
            if name == "mlx_lm_model_state" and value == 1:
                flat["state"] = dict(labels)["state"]
        return flat

    def wait_state(self, state: str, timeout: float = 120) -> dict[str, float | str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            figures = self.metrics()
            if figures.get("state") == state:
                return figures
            time.sleep(0.05)
        raise UserError(f"the model did not become {state} within {timeout:g} s")

    def rss(self) -> int:
        """The RSS once it stops moving."""
        return settled_rss(self.process.pid)


def _post_malformed(url: str) -> None:
    """A 400: the server imports its request handlers' code, and loads nothing."""
    request = urllib.request.Request(f"{url}/v1/chat/completions", b"{", {})
    with suppress(urllib.error.HTTPError):
        urllib.request.urlopen(request, timeout=60).close()


@contextmanager
def server(python: str, args: Sequence[str], log: Path) -> Iterator[Server]:
    """A patched server on a free port, always stopped."""
    port = free_port()
    command = [python, "-m", "mlx_lm.server", "--host", "127.0.0.1", "--port", str(port)]
    with log.open("a") as out:
        process = subprocess.Popen(
            [*command, *args], stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        if not wait_healthy("127.0.0.1", port, 300, lambda: process.poll() is None, 0.2):
            raise UserError(f"the server did not start; see {log}")
        yield Server(process, f"http://127.0.0.1:{port}", port)
    finally:
        if process.poll() is None:
            terminate(process.pid, 30)
            process.wait()


def evict_from_file_cache(path: Path) -> None:
    """Drop a file's pages from the OS file cache, so that the next read comes from disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _stream(s: Server, messages: list[dict], bias: dict[int, float], tokens: int) -> Reply:
    body = {
        "messages": messages,
        "max_tokens": tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "logit_bias": {str(k): v for k, v in bias.items()},
    }
    return stream_request(s.port, "/v1/chat/completions", body)


def _chat(s: Server, messages: list[dict], bias: dict[int, float]) -> tuple[float, str, dict]:
    reply = _stream(s, messages, bias, ANSWER_TOKENS)
    return reply.ttft, reply.text, {"prompt_tokens": reply.prompt_tokens}


def _turns(system: str, answer: str) -> tuple[list[dict], list[dict]]:
    first = [
        {"role": "system", "content": system},
        {"role": "user", "content": "Summarise the notes."},
    ]
    second = [
        *first,
        {"role": "assistant", "content": answer},
        {"role": "user", "content": "And then what happened next?"},
    ]
    return first, second


def memory_and_load(python: str, root: Path, idle: float) -> dict:
    """RSS and mlx memory: nothing loaded, loaded, idle; reloads from file cache and disk."""
    model = build_variant(root / "wide", model_type="qwen3", float32=True, **WIDE)
    weights = model / "model.safetensors"
    common = ["--idle-unload", f"{idle:g}", "--prompt-cache-dir", str(root / "pc-wide")]
    log = root / "wide.log"
    with server(python, common, log) as s:
        _post_malformed(s.url)  # like the other server, it has answered a POST
        baseline = s.rss()
        baseline_anon = anon_rss(s.process.pid)
    hello = [{"role": "user", "content": "hello"}]
    with server(python, ["--model", str(model), *common], log) as s:
        _chat(s, hello, {})
        loaded, loaded_mx = s.rss(), s.metrics()
        s.wait_state("unloaded")
        unloaded, idle_mx = s.rss(), s.metrics()
        unloaded_anon = anon_rss(s.process.pid)
        _chat(s, hello, {})  # reload with the weights in the file cache
        cached_reload = float(s.metrics()["mlx_lm_idle_last_reload_seconds"])
        s.wait_state("unloaded")
        evict_from_file_cache(weights)
        _chat(s, hello, {})  # reload from disk
        disk_reload = float(s.metrics()["mlx_lm_idle_last_reload_seconds"])
        pid_kept = s.process.poll() is None
    return {
        "weights_bytes": weights.stat().st_size,
        "rss_nothing_loaded": baseline,
        "rss_loaded": loaded,
        "rss_idle": unloaded,
        "rss_anon_nothing_loaded": baseline_anon,
        "rss_anon_idle": unloaded_anon,
        "mlx_active_loaded": loaded_mx["mlx_lm_memory_active_bytes"],
        "mlx_active_idle": idle_mx["mlx_lm_memory_active_bytes"],
        "mlx_cache_idle": idle_mx["mlx_lm_memory_cache_bytes"],
        "reload_seconds_file_cache": cached_reload,
        "reload_seconds_disk": disk_reload,
        "same_process": pid_kept,
    }


def next_turn(python: str, model: Path, root: Path, idle: float, prefix: int) -> dict:
    """The same next turn on `model`: warm in memory, after a wake-up (disk tier), cold."""
    bias = {i: -100.0 for i in end_of_text_ids(model)}
    maker = PromptMaker(model)
    args = ["--model", str(model), "--idle-unload", f"{idle:g}"]
    args += ["--prompt-cache-dir", str(root / "pc-bench")]
    result: dict = {}
    with server(python, args, root / "bench.log") as s:
        # warm: A's first turn, then its second turn from the memory tier
        a1, a2 = _turns(maker.text(prefix), "")
        _, answer, _ = _chat(s, a1, bias)
        a1, a2 = _turns(a1[0]["content"], answer)
        result["warm_ttft"], _, usage = _chat(s, a2, bias)
        result["prompt_tokens"] = usage["prompt_tokens"]
        # wake-up: B's first turn, unload, B's second turn (reload + disk tier)
        b1, _ = _turns(maker.text(prefix), "")
        _, answer, _ = _chat(s, b1, bias)
        _, b2 = _turns(b1[0]["content"], answer)
        s.wait_state("unloaded")
        before = s.metrics()
        result["wake_ttft"], _, _ = _chat(s, b2, bias)
        after = s.metrics()
        result["wake_load"] = float(after["mlx_lm_idle_last_reload_seconds"])
        result["wake_processed"] = int(
            after["mlx_lm_prompt_tokens_processed_total"]
            - before["mlx_lm_prompt_tokens_processed_total"]
        )
        # cold: C's second turn, never seen, after an unload (reload + the whole prompt)
        _, c2 = _turns(maker.text(prefix), answer)
        s.wait_state("unloaded")
        before = s.metrics()
        result["cold_ttft"], _, _ = _chat(s, c2, bias)
        after = s.metrics()
        result["cold_load"] = float(after["mlx_lm_idle_last_reload_seconds"])
        result["cold_processed"] = int(
            after["mlx_lm_prompt_tokens_processed_total"]
            - before["mlx_lm_prompt_tokens_processed_total"]
        )
        result["reloads"] = int(after["mlx_lm_idle_reloads_total"])
    return result


def loaded_cost(python: str, model: Path, root: Path, prefix: int, rounds: int) -> dict:
    """A new prompt's prefill and the decode rate on `model`, with and without
    --idle-unload (never reached), the servers started in turn; each side's median."""
    bias = {i: -100.0 for i in end_of_text_ids(model)}
    maker = PromptMaker(model)
    sides: dict[str, dict[str, list[float]]] = {
        side: {"prefill": [], "decode": []} for side in ("off", "on")
    }
    for _ in range(rounds):
        for side, extra in (("off", []), ("on", ["--idle-unload", "3600"])):
            with server(python, ["--model", str(model), *extra], root / "cost.log") as s:
                first, _ = _turns(maker.text(prefix), "")
                reply = _stream(s, first, bias, DECODE_TOKENS)
                sides[side]["prefill"].append(reply.ttft)
                sides[side]["decode"].append(reply.decode_tps or 0.0)
    return {
        side: {name: statistics.median(values) for name, values in figures.items()}
        for side, figures in sides.items()
    } | {"rounds": rounds}


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def report(memory: dict, turn: dict, cost: dict) -> str:
    """The figures and their ratios, as printed."""
    m, t, off, on = memory, turn, cost["off"], cost["on"]
    held = m["rss_loaded"] - m["rss_nothing_loaded"]
    left = m["rss_idle"] - m["rss_nothing_loaded"]
    rate = m["weights_bytes"] / m["reload_seconds_disk"]
    cached_rate = m["weights_bytes"] / m["reload_seconds_file_cache"]
    wake_prefill = t["wake_ttft"] - t["wake_load"]
    cold_prefill = t["cold_ttft"] - t["cold_load"]
    # A load's fixed part (config, tokenizer, building the model): the bench model's reload,
    # whose weights are 3 MB; the rest grows with the weights.
    fixed = min(t["wake_load"], t["cold_load"])
    byte_rate = m["weights_bytes"] / max(m["reload_seconds_disk"] - fixed, 1e-3)
    cached_byte_rate = m["weights_bytes"] / max(m["reload_seconds_file_cache"] - fixed, 1e-3)
    large_load = fixed + LARGE_MODEL_BYTES / byte_rate
    large_cached = fixed + LARGE_MODEL_BYTES / cached_byte_rate
    lines = [
        f"memory (wide demo variant, {_mib(m['weights_bytes'])} of weights):",
        f"  RSS: nothing loaded {_mib(m['rss_nothing_loaded'])}, loaded {_mib(m['rss_loaded'])}"
        f", idle {_mib(m['rss_idle'])} (same process: {m['same_process']})",
        f"  idle / loaded RSS: {m['rss_idle'] / m['rss_loaded']:.3f}; idle / nothing loaded: "
        f"{m['rss_idle'] / m['rss_nothing_loaded']:.3f}; of the {_mib(held)} the model held, "
        f"{_mib(left)} stay ({left / held:.3f})",
        (
            f"  own data (RssAnon): nothing loaded {_mib(m['rss_anon_nothing_loaded'])}, idle "
            f"{_mib(m['rss_anon_idle'])} ({m['rss_anon_idle'] / m['rss_anon_nothing_loaded']:.3f})"
            if m.get("rss_anon_idle") and m.get("rss_anon_nothing_loaded")
            else "  own data (RssAnon): not available here"
        ),
        f"  mlx active: loaded {int(m['mlx_active_loaded'])} bytes, idle "
        f"{int(m['mlx_active_idle'])} bytes; mlx cache idle {int(m['mlx_cache_idle'])} bytes",
        f"  reload: {m['reload_seconds_file_cache']:.2f} s from the file cache "
        f"({cached_rate / 1e6:.0f} MB/s), {m['reload_seconds_disk']:.2f} s from disk "
        f"({rate / 1e6:.0f} MB/s)",
        f"next turn (bench-qwen3, {t['prompt_tokens']} prompt tokens):",
        f"  warm in memory: TTFT {t['warm_ttft']:.3f} s",
        f"  after a wake-up: TTFT {t['wake_ttft']:.3f} s = load {t['wake_load']:.3f} s + "
        f"prefill {wake_prefill:.3f} s ({t['wake_processed']} tokens processed)",
        f"  cold: TTFT {t['cold_ttft']:.3f} s = load {t['cold_load']:.3f} s + prefill "
        f"{cold_prefill:.3f} s ({t['cold_processed']} tokens processed)",
        f"  wake-up / warm: {t['wake_ttft'] / t['warm_ttft']:.2f}; wake-up / cold: "
        f"{t['wake_ttft'] / t['cold_ttft']:.3f}; prefill wake-up / cold: "
        f"{wake_prefill / cold_prefill:.3f}",
        f"estimate for a 60 GB model (an estimate, not a measurement): a fixed {fixed:.2f} s "
        f"+ the weights at the rates measured here, {byte_rate / 1e6:.0f} MB/s from disk and "
        f"{cached_byte_rate / 1e6:.0f} MB/s from the file cache: a reload of {large_load:.0f} s "
        f"from disk, {large_cached:.0f} s from the file cache; the first turn after a wake-up "
        "is that plus the new tokens' prefill, a cold one that plus the whole prompt's",
        f"while loaded (bench-qwen3, medians of {cost['rounds']} servers each, started in turn):",
        f"  a new prompt's TTFT: {off['prefill']:.3f} s without --idle-unload, "
        f"{on['prefill']:.3f} s with it ({on['prefill'] / off['prefill']:.3f})",
        f"  decode: {off['decode']:.1f} tokens/s without, {on['decode']:.1f} with it "
        f"({on['decode'] / off['decode']:.3f})",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run both parts and print the figures with their ratios (and --json FILE)."""
    parser = argparse.ArgumentParser(
        prog="python -m mlx_local.bench.idle", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--prefix", type=int, default=2048, help="prefix tokens (2048)")
    parser.add_argument("--idle", type=float, default=2.0, help="--idle-unload seconds (2)")
    parser.add_argument("--rounds", type=int, default=3, help="servers per side (3)")
    parser.add_argument("--python", default=sys.executable, help="python with the patched mlx_lm")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    if "--idle-unload" not in server_options(Path(args.python)):
        raise UserError(f"{args.python}: its mlx_lm.server has no --idle-unload (patch 0015)")
    with tempfile.TemporaryDirectory(prefix="bench-idle-") as tmp:
        root = Path(tmp)
        try:
            memory = memory_and_load(args.python, root, args.idle)
            model = build_bench_model(root / "bench")
            turn = next_turn(args.python, model, root, args.idle, args.prefix)
            cost = loaded_cost(args.python, model, root, args.prefix, args.rounds)
        except (UserError, OSError, http.client.HTTPException):
            for log in sorted(root.glob("*.log")):
                print(f"--- {log.name}\n{log.read_text(errors='replace')[-2000:]}")
            raise
    print(report(memory, turn, cost))
    if args.json:
        figures = {"memory": memory, "next_turn": turn, "loaded_cost": cost}
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as error:
        sys.exit(f"bench.idle: {error}")

"""Benchmarks: the patched server against upstream's server of the same release, same model.

Measures time to first token (cold vs a warm follow-up sharing a long prefix), decode speed,
KV cache bytes with and without quantization, the prompt cache size with interleaved
conversations, a restart with and without the disk prompt cache, and peak memory. Every figure
is a median of repeats; ratios are computed within the same run. Returns plain data; the CLI
renders it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from . import checkout, gitutil
from .bench_prompts import PromptMaker, end_of_text_ids
from .bench_server import BenchServer, Reply
from .errors import UserError
from .project import Project

Progress = Callable[[str], None]

KV_RUNNER = Path(__file__).with_name("bench_kv.py")
EOS_BIAS = -1000.0


@dataclass(frozen=True)
class Settings:
    """What to measure and how often."""

    model: Path
    out_dir: Path
    repeats: int
    quick: bool
    prefixes: list[int]
    decode_tokens: int
    first_turn_tokens: int
    interleave_prefix: int
    kv_contexts: list[int]
    kv_server_prefix: int
    restart_prefix: int


def settings(model: Path, out_dir: Path, quick: bool, repeats: int | None) -> Settings:
    """Full runs use 2K/4K/8K prefixes; --quick uses tiny ones (a plumbing check)."""
    if quick:
        return Settings(
            model=model,
            out_dir=out_dir,
            repeats=repeats or 1,
            quick=True,
            prefixes=[64, 128],
            decode_tokens=4,
            first_turn_tokens=2,
            interleave_prefix=64,
            kv_contexts=[64, 128, 256],
            kv_server_prefix=128,
            restart_prefix=64,
        )
    return Settings(
        model=model,
        out_dir=out_dir,
        repeats=repeats or 3,
        quick=False,
        prefixes=[2048, 4096, 8192],
        decode_tokens=32,
        first_turn_tokens=8,
        interleave_prefix=2048,
        kv_contexts=[1024, 2048, 4096, 8192],
        kv_server_prefix=4096,
        restart_prefix=4096,
    )


@dataclass
class Runtime:
    """The two interpreters' setups: patched (the checkout) and pristine upstream."""

    python: Path
    base: str
    upstream_tree: Path
    options: set[str] = field(default_factory=set)

    @property
    def upstream_env(self) -> dict[str, str]:
        """Environment that makes `python` import upstream's unpatched mlx_lm."""
        return {"PYTHONPATH": str(self.upstream_tree)}


# ---- the two servers -----------------------------------------------------------------------


def upstream_tree(project: Project, repo: Path, base: str) -> Path:
    """A pristine copy of the base release's files (`git archive`), reused between runs."""
    dest = project.cache_dir / "bench" / f"upstream-{base}"
    if (dest / "mlx_lm" / "server.py").is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-upstream-{base}-", dir=dest.parent))
    try:
        archive = tmp / "tree.tar"
        gitutil.git(repo, "archive", "--format=tar", f"--output={archive}", base)
        with tarfile.open(archive) as tar:
            tar.extractall(tmp / "tree", filter="data")
        (tmp / "tree").rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def imported_from(python: Path, env: dict[str, str] | None = None) -> Path:
    """Where `python` (with `env`) imports mlx_lm from."""
    code = "import mlx_lm, os; print(os.path.dirname(os.path.abspath(mlx_lm.__file__)))"
    result = subprocess.run(
        [str(python), "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
    )
    if result.returncode != 0:
        raise UserError(
            f"{python} cannot import mlx_lm; run `setup-repo` (or set MLX_LOCAL_PYTHON)"
        )
    return Path(result.stdout.strip()).parent


def server_options(python: Path, env: dict[str, str] | None = None) -> set[str]:
    """The options the server's --help lists."""
    result = subprocess.run(
        [str(python), "-m", "mlx_lm.server", "--help"],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
    )
    return set(re.findall(r"--[a-z0-9][a-z0-9-]*", result.stdout))


def prepare(project: Project, python: Path) -> Runtime:
    """Check the patched runtime and lay out the pristine upstream tree next to it."""
    repo, base = checkout.require_checkout(project)
    tree = upstream_tree(project, repo, base)
    runtime = Runtime(python, base, tree)
    origin = imported_from(python, runtime.upstream_env)
    if origin.resolve() != tree.resolve():
        raise UserError(f"with PYTHONPATH={tree}, {python} still imports mlx_lm from {origin}")
    runtime.options = server_options(python)
    return runtime


# ---- measurements --------------------------------------------------------------------------


def median(values: list[float | None]) -> float | None:
    """Median of the values that exist, or None."""
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b when both exist."""
    return a / b if a is not None and b else None


class Session:
    """Requests against one server, with the prompts and eos bias of the model."""

    def __init__(self, server: BenchServer, prompts: PromptMaker, bias: dict[int, float]) -> None:
        self.server = server
        self.prompts = prompts
        self.bias = bias

    def ask(self, messages: list[dict], max_tokens: int) -> Reply:
        return self.server.chat(messages, max_tokens, self.bias)

    def first_turn(self, prefix: int, max_tokens: int) -> tuple[list[dict], Reply]:
        """A new conversation whose system prompt is `prefix` tokens long."""
        messages = [
            {"role": "system", "content": self.prompts.text(prefix)},
            {"role": "user", "content": "Summarise the notes above in one line."},
        ]
        return messages, self.ask(messages, max_tokens)

    def next_turn(self, messages: list[dict], reply: Reply, max_tokens: int) -> Reply:
        """The conversation's next turn: everything so far plus a new question."""
        follow_up = [
            *messages,
            {"role": "assistant", "content": reply.text},
            {"role": "user", "content": "Now list three details from it."},
        ]
        return self.ask(follow_up, max_tokens)


def prefix_sweep(session: Session, s: Settings) -> tuple[dict, dict]:
    """TTFT cold vs warm per prefix size, and decode speed at short and long context."""
    ttft = {}
    long_rates: list[float | None] = []
    for prefix in s.prefixes:
        cold, warm, tokens = [], [], []
        for _ in range(s.repeats):
            messages, first = session.first_turn(prefix, s.first_turn_tokens)
            follow = session.next_turn(messages, first, s.decode_tokens)
            cold.append(first.ttft)
            warm.append(follow.ttft)
            tokens.append(first.prompt_tokens)
            if prefix == s.prefixes[-1]:
                long_rates.append(follow.decode_tps)
        cold_s, warm_s = median(cold), median(warm)
        ttft[str(prefix)] = {
            "prompt_tokens": median(tokens),
            "cold_s": cold_s,
            "warm_s": warm_s,
            "warm_over_cold": ratio(warm_s, cold_s),
        }
    short = [
        session.ask([{"role": "user", "content": "Hello."}], s.decode_tokens).decode_tps
        for _ in range(s.repeats)
    ]
    decode = {
        "short_tps": median(short),
        "long_tps": median(long_rates),
        "long_context": s.prefixes[-1],
        "tokens": s.decode_tokens,
    }
    return ttft, decode


def interleaved(session: Session, s: Settings) -> dict:
    """Conversations A, B, then A's next turn: TTFT of the return to A against A's cold TTFT."""
    cold, back = [], []
    for _ in range(s.repeats):
        a_messages, a_first = session.first_turn(s.interleave_prefix, s.first_turn_tokens)
        session.first_turn(s.interleave_prefix, s.first_turn_tokens)
        back.append(session.next_turn(a_messages, a_first, s.first_turn_tokens).ttft)
        cold.append(a_first.ttft)
    cold_s, back_s = median(cold), median(back)
    return {"cold_s": cold_s, "return_to_a_s": back_s, "return_over_cold": ratio(back_s, cold_s)}


def kv_server(session: Session, s: Settings) -> dict:
    """Cold TTFT and decode speed of a long conversation's next turn."""
    cold, rates = [], []
    for _ in range(s.repeats):
        messages, first = session.first_turn(s.kv_server_prefix, s.first_turn_tokens)
        rates.append(session.next_turn(messages, first, s.decode_tokens).decode_tps)
        cold.append(first.ttft)
    return {"context": s.kv_server_prefix, "cold_s": median(cold), "decode_tps": median(rates)}


def kv_in_process(runtime: Runtime, s: Settings) -> dict:
    """KV cache bytes per context length and decode speed per bit width (bench_kv.py)."""
    command = [
        str(runtime.python),
        str(KV_RUNNER),
        "--model",
        str(s.model),
        "--contexts",
        ",".join(map(str, s.kv_contexts)),
        "--bits",
        "0,8,4",
        "--decode-tokens",
        str(s.decode_tokens),
        "--repeats",
        str(s.repeats),
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        tail = result.stderr.strip().splitlines()[-3:]
        raise UserError(f"the KV cache measurement failed: {' | '.join(tail)}")
    data = json.loads(result.stdout.strip().splitlines()[-1])
    longest = str(max(s.kv_contexts))
    full = data["configs"]["fp16"]
    for entry in data["configs"].values():
        entry["bytes_over_fp16"] = ratio(entry["bytes"][longest], full["bytes"][longest])
        entry["decode_over_fp16"] = ratio(entry["decode_tps"], full["decode_tps"])
    return data


# ---- the run -------------------------------------------------------------------------------


class Runner:
    """Starts each server configuration in turn and collects the figures."""

    def __init__(self, runtime: Runtime, s: Settings, progress: Progress) -> None:
        self.runtime = runtime
        self.s = s
        self.progress = progress
        self.prompts = PromptMaker(s.model)
        self.bias = {token: EOS_BIAS for token in end_of_text_ids(s.model)}
        self.logs = s.out_dir / "logs"
        self.peak_rss: dict[str, int | None] = {}

    def server(self, label: str, args: list[str], upstream: bool = False) -> BenchServer:
        env = self.runtime.upstream_env if upstream else None
        log = self.logs / f"{re.sub(r'[^a-z0-9]+', '-', label.lower()).strip('-')}.log"
        return BenchServer(self.runtime.python, self.s.model, args, log, env)

    def session(self, server: BenchServer) -> Session:
        return Session(server, self.prompts, self.bias)

    def has(self, *options: str) -> bool:
        return all(option in self.runtime.options for option in options)

    def main_servers(self) -> tuple[dict, dict, dict]:
        """Upstream and patched with default settings: prefix sweep, decode, A/B/A."""
        ttft, decode, inter = {}, {}, {}
        for variant, upstream in (("upstream", True), ("patched", False)):
            self.progress(f"{variant} server: TTFT over prefixes {self.s.prefixes}")
            with self.server(variant, [], upstream) as server:
                session = self.session(server)
                ttft[variant], decode[variant] = prefix_sweep(session, self.s)
                self.progress(f"{variant} server: A, B, A with the default prompt cache")
                inter[f"{variant} (default)"] = interleaved(session, self.s)
                self.peak_rss[variant] = server.peak_rss()
        return ttft, decode, inter

    def cache_sizes(self, inter: dict) -> None:
        """A, B, A with --prompt-cache-size 1 and 3."""
        if not self.has("--prompt-cache-size"):
            inter["patched --prompt-cache-size"] = {"note": "not available in this checkout"}
            return
        for size in (1, 3):
            label = f"patched --prompt-cache-size {size}"
            self.progress(f"{label}: A, B, A")
            with self.server(label, ["--prompt-cache-size", str(size)]) as server:
                inter[label] = interleaved(self.session(server), self.s)
                self.peak_rss[label] = server.peak_rss()

    def kv_servers(self, group_size: int) -> dict:
        """Decode speed and memory of the patched server with each KV cache width."""
        results = {}
        widths: list[int | None] = [None]
        if self.has("--kv-bits"):
            widths += [8, 4]
        for bits in widths:
            label = "patched fp16 KV" if bits is None else f"patched --kv-bits {bits}"
            args = [] if bits is None else ["--kv-bits", str(bits)]
            if bits is not None and self.has("--kv-group-size", "--quantized-kv-start"):
                args += ["--kv-group-size", str(group_size), "--quantized-kv-start", "0"]
            self.progress(f"{label}: long conversation at {self.s.kv_server_prefix} tokens")
            with self.server(label, args) as server:
                results[label] = kv_server(self.session(server), self.s)
                self.peak_rss[label] = server.peak_rss()
        return results

    def restart(self, reference_warm: float | None) -> dict:
        """A conversation's next turn right after a restart, with and without the disk cache."""
        if not self.has("--prompt-cache-dir"):
            return {"available": False, "note": "needs --prompt-cache-dir (patch 0005)"}
        result: dict = {"available": True, "context": self.s.restart_prefix}
        for label, with_disk in (("without disk cache", False), ("with disk cache", True)):
            cache_dir = Path(tempfile.mkdtemp(prefix="bench-disk-cache-"))
            args = ["--prompt-cache-dir", str(cache_dir)] if with_disk else []
            name = f"patched restart {label}"
            self.progress(f"{name}: {self.s.repeats} conversations, restart, next turns")
            try:
                with self.server(name, args) as server:
                    session = self.session(server)
                    turns = [
                        session.first_turn(self.s.restart_prefix, self.s.first_turn_tokens)
                        for _ in range(self.s.repeats)
                    ]
                with self.server(name, args) as server:
                    session = self.session(server)
                    after = [
                        session.next_turn(m, r, self.s.first_turn_tokens).ttft for m, r in turns
                    ]
                    self.peak_rss[name] = server.peak_rss()
            finally:
                shutil.rmtree(cache_dir, ignore_errors=True)
            after_s = median(after)
            result[label] = {
                "cold_s": median([r.ttft for _, r in turns]),
                "after_restart_s": after_s,
                "over_warm_in_memory": ratio(after_s, reference_warm),
            }
        return result

    def run(self) -> dict:
        ttft, decode, inter = self.main_servers()
        self.cache_sizes(inter)
        self.progress("KV cache bytes and decode speed in-process (bench_kv.py)")
        kv = kv_in_process(self.runtime, self.s)
        kv["server"] = self.kv_servers(kv["group_size"])
        warm = ttft["patched"].get(str(self.s.restart_prefix), {}).get("warm_s")
        restart = self.restart(warm)
        return {
            "ttft": ttft,
            "decode": decode,
            "kv_cache": kv,
            "interleaved": inter,
            "restart": restart,
            "peak_rss_bytes": self.peak_rss,
        }


def run(project: Project, python: Path, s: Settings, progress: Progress) -> dict:
    """Run every benchmark; write bench.json into `s.out_dir`; return the results."""
    runtime = prepare(project, python)
    s.out_dir.mkdir(parents=True, exist_ok=True)
    started = datetime.now(UTC)
    results = Runner(runtime, s, progress).run()
    results["meta"] = {
        "model": str(s.model),
        "quick": s.quick,
        "repeats": s.repeats,
        "base": runtime.base,
        "python": str(python),
        "upstream_tree": str(runtime.upstream_tree),
        "patched_options": sorted(
            o
            for o in runtime.options
            if o in ("--prompt-cache-size", "--kv-bits", "--prompt-cache-dir")
        ),
        "started": started.isoformat(timespec="seconds"),
        "seconds": round((datetime.now(UTC) - started).total_seconds(), 1),
    }
    (s.out_dir / "bench.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return results

"""Benchmarks: the patched server against upstream's server of the same release, same model.

Measures time to first token (cold vs a warm follow-up sharing a long prefix), decode speed,
KV cache bytes with and without quantization, the prompt cache size with interleaved
conversations, a restart with and without the disk prompt cache, and peak memory. Every figure
is a median of repeats; ratios are computed within the same run. Returns plain data; the CLI
renders it.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from ..project import Project
from .measure import Session, interleaved, kv_in_process, kv_server, median, prefix_sweep, ratio
from .prompts import PromptMaker, end_of_text_ids
from .runtime import Runtime, prepare
from .server import BenchServer
from .settings import Settings

Progress = Callable[[str], None]


EOS_BIAS = -1000.0
QUANTIZE_BEFORE_END = 512
"""The KV servers quantize from this many tokens before the end of the long prefix: its
prefill runs mostly at full precision (quantized attention is slow on mlx's CPU backend)
and the next turn decodes on the quantized cache, which is what is measured."""


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
                start = max(0, self.s.kv_server_prefix - QUANTIZE_BEFORE_END)
                args += ["--kv-group-size", str(group_size), "--quantized-kv-start", str(start)]
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
        self.progress("KV cache bytes and decode speed in-process (kv_runner.py)")
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

"""The next turn after a group restart: TTFT with the per-rank disk tier, without it, and
warm in memory; the bytes each rank writes per entry against one rank's. One run.

    python -m mlx_local.bench.group_restart [--ranks 2] [--tokens 2000]

Drives the real `mlx-local start` / `stop` on a scratch project (this project's checkout,
its [distributed] table with every rank on 127.0.0.1), on a wider demo variant (float32, so
that a long prompt's prefill stands out). Each configuration: a first turn of `--tokens`
tokens, then the next turn of the conversation, (a) at once (the in-memory cache), (b) after
`stop` + `start` with the disk tier (each rank loads its own shard), (c) the same without the
disk tier (`prompt_cache_dir = false`: cold). One small shared machine: the ranks compete for
the same cores, so the figures show the mechanism, not a Mac's speed.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .. import project
from ..models.demo_variant import build_variant
from ..processes import free_port
from .prompts import PromptMaker
from .server import READ_TIMEOUT

WIDE = {"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 4}
CLI = Path(sys.executable).parent / "mlx-local"


def _cli(root: Path, *args: str) -> None:
    env = {**os.environ, "MLX_LOCAL_HOME": str(root), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [str(CLI), *args], env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL
    )
    if result.returncode != 0:
        raise SystemExit(f"mlx-local {' '.join(args)} failed: {result.stdout}{result.stderr}")


def _project(base: Path, model: Path, ranks: int, disk: bool) -> tuple[Path, int]:
    root = base / f"{ranks}-ranks-{'disk' if disk else 'nodisk'}"
    (root / "local-models").mkdir(parents=True)
    (root / "mlx-lm-repo").symlink_to(project.current().checkout_dir)
    port = free_port()
    text = f'model = "{model}"\nport = {port}\nmax_tokens = 4\n'
    text += "" if disk else "prompt_cache_dir = false\n"
    text += "[service]\nstart_timeout = 600\n"
    if ranks > 1:
        hosts = json.dumps(["127.0.0.1"] * ranks)
        text += f"[distributed]\nhosts = {hosts}\nstarting_port = {min(free_port(), 60000)}\n"
    (root / "config.toml").write_text(text)
    return root, port


@dataclass
class Turn:
    """One streamed turn: time to the first token, the usage, the text."""

    ttft: float
    usage: dict
    text: str


def _turn(port: int, messages: list[dict]) -> Turn:
    body = {"messages": messages, "max_tokens": 4, "temperature": 0.0, "stream": True}
    body["stream_options"] = {"include_usage": True}
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=READ_TIMEOUT)
    start = time.perf_counter()
    connection.request("POST", "/v1/chat/completions", json.dumps(body).encode())
    response = connection.getresponse()
    first, usage, text = None, {}, []
    for raw in response:
        line = raw.decode(errors="replace").strip()
        if not line.startswith("data:") or line[5:].strip() == "[DONE]":
            continue
        chunk = json.loads(line[5:])
        if chunk.get("choices"):
            first = first or time.perf_counter()
            text.append((chunk["choices"][0].get("delta") or {}).get("content") or "")
        usage = chunk.get("usage") or usage
    connection.close()
    return Turn((first or time.perf_counter()) - start, usage, "".join(text))


def _disk_bytes(root: Path) -> dict[str, int]:
    """Bytes of each folder of the disk tier (one per rank in a group)."""
    folder = root / ".cache" / "prompt-cache"
    return (
        {
            sub.name: sum(f.stat().st_size for f in sub.glob("*.safetensors"))
            for sub in sorted(folder.iterdir())
            if sub.is_dir()
        }
        if folder.is_dir()
        else {}
    )


def run(base: Path, model: Path, ranks: int, disk: bool, prompt: str) -> dict:
    """One configuration: the first turn, the next at once, the next after a restart."""
    root, port = _project(base, model, ranks, disk)
    first = [{"role": "user", "content": prompt}]
    _cli(root, "start")
    try:
        cold = _turn(port, first)
        nxt = [*first, {"role": "assistant", "content": cold.text}]
        nxt.append({"role": "user", "content": "And what comes next?"})
        memory = _turn(port, nxt)
    finally:
        _cli(root, "stop")
    written = _disk_bytes(root)
    _cli(root, "start")
    try:
        restarted = _turn(port, nxt)
    finally:
        _cli(root, "stop")
    return {
        "ranks": ranks,
        "disk": disk,
        "prompt_tokens": cold.usage.get("prompt_tokens"),
        "ttft_first": cold.ttft,
        "ttft_next_in_memory": memory.ttft,
        "ttft_next_after_restart": restarted.ttft,
        "cached_after_restart": (restarted.usage.get("prompt_tokens_details") or {}).get(
            "cached_tokens"
        ),
        "disk_bytes": written,
    }


def main(argv: list[str] | None = None) -> int:
    """Run the three configurations and print one table (and the JSON)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=2000)
    args = parser.parse_args(argv)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-group-restart-") as tmp:
        base = Path(tmp)
        model = build_variant(base / "wide", float32=True, **WIDE)
        prompt = PromptMaker(model).text(args.tokens)
        results = [
            run(base, model, args.ranks, True, prompt),
            run(base, model, args.ranks, False, prompt),
            run(base, model, 1, True, prompt),
        ]
    print(json.dumps(results, indent=2))
    print(f"{'configuration':<26}{'first':>8}{'next: memory':>14}{'next: restart':>15}  cached")
    for r in results:
        label = f"{r['ranks']} rank(s), disk {'on' if r['disk'] else 'off'}"
        print(
            f"{label:<26}{r['ttft_first']:>7.2f}s{r['ttft_next_in_memory']:>13.2f}s"
            f"{r['ttft_next_after_restart']:>14.2f}s  {r['cached_after_restart']}"
        )
    for r in (results[0], results[2]):
        shown = ", ".join(
            f"{name}: {count / 2**20:.2f} MiB" for name, count in r["disk_bytes"].items()
        )
        print(f"disk tier after the first turn, {r['ranks']} rank(s): {shown}")
    print(f"{time.monotonic() - started:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

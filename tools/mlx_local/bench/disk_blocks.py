"""Benchmark: the disk tier in blocks against the whole entries it replaced (issue 24).

One run serves the demo model twice on the same prompts: with the disk tier of this checkout
(blocks) and with the whole-entry tier of patch 0005 before blocks (its module taken from
this repository's history, dropped into a copy of the same mlx_lm). Each serves a
conversation with a long system prompt and five short follow-ups, then three more sessions
with the same system prompt; a runner in the runtime python then times loading the
conversation's prefix from each folder. Prints the ratios the issue asks for:

- bytes written by the five follow-ups / by the first turn;
- disk bytes after three more sessions sharing the prefix / after the one conversation;
- load time of the prefix (median of several loads), blocks / one file.

    .venv/bin/python -m mlx_local.bench.disk_blocks [--system-tokens N] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from ..errors import UserError
from ..models.demo_model import build_demo_model, corpus_text
from ..project import find_root
from ..repo import gitutil
from .prompts import PromptMaker
from .runtime import imported_from
from .server import BenchServer

PATCH = "patches/0005-server-prompt-cache-dir.patch"
MODULE = "mlx_lm/prompt_cache_disk.py"
RUNNER = Path(__file__).with_name("disk_blocks_runner.py")


def whole_entry_module(root: Path) -> str:
    """The disk tier module of patch 0005 before blocks, from this repository's history
    (the parent of the commit that brought prompt_cache_blocks into the patch)."""
    commits = gitutil.out(
        root, "log", "--format=%H", "-S", "prompt_cache_blocks", "--", PATCH
    ).split()
    if not commits:
        raise UserError(f"{root}: no commit of {PATCH} brings the blocks; nothing to compare")
    patch = gitutil.out(root, "show", f"{commits[-1]}^:{PATCH}")
    start = patch.index(f"+++ b/{MODULE}\n")
    hunk = patch[start:].split("\n", 2)[2]
    lines = []
    for line in hunk.splitlines():
        if line.startswith("diff --git"):
            break
        if line.startswith("+"):
            lines.append(line[1:])
    text = "\n".join(lines) + "\n"
    # the server of this checkout hands the group over too: accept it, unused
    return text.replace(
        "def __init__(self, memory, cli_args):", "def __init__(self, memory, cli_args, group=None):"
    )


def whole_entry_tree(python: Path, root: Path, dest: Path) -> Path:
    """A copy of the runtime's mlx_lm with the whole-entry disk tier (for PYTHONPATH)."""
    shutil.copytree(imported_from(python) / "mlx_lm", dest / "mlx_lm")
    (dest / MODULE).write_text(whole_entry_module(root))
    return dest


def _metrics(url: str) -> dict[str, float]:
    with urllib.request.urlopen(f"{url}/metrics", timeout=30) as response:
        text = response.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("mlx_lm_"):
            name, value = line.rsplit(" ", 1)
            out[name[len("mlx_lm_") :]] = float(value)
    return out


def _settle(url: str, timeout: float = 300) -> dict[str, float]:
    """Wait until the disk tier has nothing pending; the metrics then."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        figures = _metrics(url)
        if figures.get("prompt_cache_disk_pending", 0) == 0:
            return figures
        time.sleep(0.2)
    raise UserError("the disk tier kept writing")


def _chat(server: BenchServer, messages: list[dict]) -> str:
    return server.chat(messages, max_tokens=8).text


def run_variant(
    python: Path, model: Path, folder: Path, system: str, log: Path, env: dict | None
) -> dict:
    """One server: the conversation, five follow-ups, three more sessions; the figures."""
    text = corpus_text()
    follow = [text[400 * i : 400 * i + 320] for i in range(5)]
    others = [f"Session {i}: {text[2500 + 300 * i : 2800 + 300 * i]}" for i in range(3)]
    args = ["--prompt-cache-dir", str(folder), "--prompt-cache-size", "2"]
    disk = 'prompt_cache_bytes{tier="disk"}'
    written = "prompt_cache_disk_written_bytes_total"
    with BenchServer(python, model, args, log, env) as server:
        url = server.base_url
        messages = [{"role": "system", "content": system}, {"role": "user", "content": "Hi."}]
        reply = _chat(server, messages)
        first = _settle(url)
        for question in follow:
            messages += [
                {"role": "assistant", "content": reply},
                {"role": "user", "content": question},
            ]
            reply = _chat(server, messages)
            _settle(url)
        one = _settle(url)
        for question in others:
            _chat(
                server,
                [{"role": "system", "content": system}, {"role": "user", "content": question}],
            )
        four = _settle(url)
    return {
        "first_turn_bytes": first[written],
        "follow_ups_bytes": one[written] - first[written],
        "one_conversation_disk_bytes": one[disk],
        "four_sessions_disk_bytes": four[disk],
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mlx_local.bench.disk_blocks", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--system-tokens", type=int, default=6200)
    parser.add_argument("--loads", type=int, default=7, help="loads timed per format")
    parser.add_argument("--python", default=sys.executable, help="python with the patched mlx_lm")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    python = Path(args.python)
    with tempfile.TemporaryDirectory(prefix="bench-disk-blocks-") as tmp:
        root = Path(tmp)
        model = build_demo_model(root / "demo")
        system = PromptMaker(model).text(args.system_tokens)
        whole = whole_entry_tree(python, find_root(), root / "whole-tree")
        results = {}
        for name, env in (("whole", {"PYTHONPATH": str(whole)}), ("blocks", None)):
            results[name] = run_variant(
                python, model, root / name, system, root / f"{name}.log", env
            )
            print(f"{name}: {results[name]}", flush=True)
        timed = subprocess.run(
            [str(python), str(RUNNER), str(root / "whole"), str(root / "blocks"),
             str(args.system_tokens - 200), str(args.loads)],
            capture_output=True, text=True,
        )  # fmt: skip
        if timed.returncode != 0:
            raise UserError(f"the load timing failed: {timed.stderr[-1500:]}")
        loads = json.loads(timed.stdout)
    figures = {name: results[name] for name in results} | {"loads": loads}
    for name, r in results.items():
        figures[name]["follow_ups_over_first"] = r["follow_ups_bytes"] / r["first_turn_bytes"]
        figures[name]["four_sessions_over_one"] = (
            r["four_sessions_disk_bytes"] / r["one_conversation_disk_bytes"]
        )
    figures["load_blocks_over_whole"] = loads["blocks_seconds"] / loads["whole_seconds"]
    print(f"{'':38} {'whole entries':>14} {'blocks':>10}")
    for key, label in (
        ("follow_ups_over_first", "five follow-ups / first turn, bytes"),
        ("four_sessions_over_one", "3 more sessions / 1 conversation"),
    ):
        print(f"{label:38} {figures['whole'][key]:>14.2f} {figures['blocks'][key]:>10.2f}")
    print(
        f"load {loads['tokens']} tokens after a restart: one file {loads['whole_seconds']:.4f} s, "
        f"{loads['files']} blocks {loads['blocks_seconds']:.4f} s "
        f"(ratio {figures['load_blocks_over_whole']:.2f})"
    )
    wide = loads["wide"]
    print(
        f"the same, {wide['bytes_per_token'] // 1024} KB a token (synthetic): one file "
        f"{wide['whole_seconds']:.4f} s, blocks {wide['blocks_seconds']:.4f} s "
        f"(ratio {wide['blocks_seconds'] / wide['whole_seconds']:.2f})"
    )
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as error:
        sys.exit(f"bench.disk_blocks: {error}")

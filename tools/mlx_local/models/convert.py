"""convert-model: download, convert, verify, and install a model of a plan into local-models/.

Conversion runs mlx_lm (the patched checkout) in a subprocess of `project.runtime_python()`,
into a temporary folder inside local-models/ that is renamed into place only once the result
loads and generates. A failure or an interruption leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .. import project
from ..errors import UserError
from ..locking import project_lock
from . import source as model_source
from .manifest import MANIFEST_FILE, build_manifest
from .planning import DEFAULT_BITS, Plan
from .runtime import run_runner

VERIFY_TOKENS = 4


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale(models_dir: Path) -> list[str]:
    """Remove what killed conversions left behind; put back a model a killed --force moved."""
    swept = []
    if not models_dir.is_dir():
        return swept
    for path in sorted(models_dir.iterdir()):
        match = re.match(r"^\.(tmp|old|rm)-(.+)-(\d+)$", path.name)
        if not match or _pid_alive(int(match[3])):
            continue
        kind, name = match[1], match[2]
        if kind == "old" and not (models_dir / name).exists():
            path.rename(models_dir / name)
        else:
            shutil.rmtree(path, ignore_errors=True)
        swept.append(path.name)
    return swept


@contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """Let SIGTERM unwind like Ctrl-C, so `finally` blocks clean up."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def convert_model(
    plan: Plan,
    proj: project.Project | None = None,
    quiet: bool = False,
) -> dict:
    """Download (if needed), convert, verify and install the model of `plan`; its manifest."""
    proj = proj or project.current()
    proj.logs_dir.mkdir(parents=True, exist_ok=True)
    log = proj.logs_dir / f"convert-{plan.name}.log"
    log.write_text(f"convert-model {plan.source.spec} -> {plan.name}\n", encoding="utf-8")
    with _sigterm_interrupts():
        source_dir = model_source.download(plan.source)
        with project_lock(proj.state_dir, f"convert-model {plan.name}"):
            proj.models_dir.mkdir(parents=True, exist_ok=True)
            sweep_stale(proj.models_dir)
            if plan.output.exists() and not plan.replaces:
                raise UserError(f"local-models/{plan.name} appeared meanwhile; use --force")
            tmp = proj.models_dir / f".tmp-{plan.name}-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                result = _convert_into(plan, source_dir, tmp, log, quiet)
                manifest = build_manifest(plan, source_dir, tmp, result)
                (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
                _install(tmp, plan.output)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def _convert_into(plan: Plan, source_dir: Path, tmp: Path, log: Path, quiet: bool) -> dict:
    quant = plan.quantization or {}
    spec = {
        "source": str(source_dir),
        "output": str(tmp),
        "quantize": plan.quantization is not None,
        "bits": quant.get("bits", DEFAULT_BITS),
        "group_size": quant.get("group_size", 64),
        "recipe": quant.get("recipe"),
        "dtype": plan.dtype,
        "verify_tokens": VERIFY_TOKENS,
    }
    result = run_runner("convert", spec, log=log, quiet=quiet)
    if result["ok"] and not result["verification"]["ok"]:
        result = {"ok": False, "kind": "verify", "message": "it generated no tokens"}
    if not result["ok"]:
        raise UserError(_failure_message(plan, result, log))
    return result


def _failure_message(plan: Plan, result: dict, log: Path) -> str:
    what = {
        "unsupported_architecture": "unsupported architecture",
        "corrupt_weights": "the weights are damaged or incomplete",
        "verify": "the converted model does not work",
        "out_of_memory": "out of memory",
    }.get(result["kind"], "conversion failed")
    message = result["message"].replace("\n", " ")
    if len(message) > 300:
        message = message[:297] + "..."
    return (
        f"converting {plan.source.spec} failed, {what}: {message} "
        f"(nothing was written to local-models/; log: {log})"
    )


def _install(tmp: Path, output: Path) -> None:
    """Rename the verified folder into place; an old model is moved aside, then deleted."""
    old = output.with_name(f".old-{output.name}-{os.getpid()}")
    if output.exists():
        output.rename(old)
    tmp.rename(output)
    shutil.rmtree(old, ignore_errors=True)

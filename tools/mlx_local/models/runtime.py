"""Running convert_runner.py in the runtime python (the patched checkout's mlx_lm)."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from contextlib import ExitStack
from pathlib import Path

from .. import project
from ..errors import UserError

RUNNER = Path(__file__).with_name("convert_runner.py")


def run_runner(
    command: str, argument: str | dict, log: Path | None = None, quiet: bool = False
) -> dict:
    """Run convert_runner.py in the runtime python; its JSON answer."""
    python = project.runtime_python()
    env = os.environ | {"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    with tempfile.TemporaryDirectory(prefix="mlx-local-runner-") as scratch, ExitStack() as stack:
        result_file = Path(scratch) / "result.json"
        if isinstance(argument, dict):
            (Path(scratch) / "spec.json").write_text(json.dumps(argument))
            argument = str(Path(scratch) / "spec.json")
        output = subprocess.DEVNULL
        if log:
            output = stack.enter_context(open(log, "a", encoding="utf-8"))
        try:
            done = subprocess.run(
                [str(python), str(RUNNER), command, argument, str(result_file)],
                stdout=output if quiet else None,
                stderr=output,
                env=env,
            )
        except FileNotFoundError:
            raise UserError(f"runtime python {python} not found; run setup-repo first") from None
        if result_file.is_file():
            return json.loads(result_file.read_text())
    where = f"; see {log}" if log else ""
    return {"ok": False, "kind": "crashed", "message": f"exit code {done.returncode}{where}"}


def probe_runtime(model_type: str) -> dict:
    """Ask the runtime python's mlx_lm whether it supports `model_type` (and its versions)."""
    result = run_runner("probe", model_type)
    if not result["ok"]:
        if result["kind"] == "no_mlx_lm":
            raise UserError(f"mlx_lm is not installed ({result['message']}); run setup-repo first")
        raise UserError(f"could not ask mlx_lm about {model_type}: {result['message']}")
    return result

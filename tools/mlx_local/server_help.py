"""The patched server's `--help`: the one way the tools ask which options it takes."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from .errors import UserError

HELP_TIMEOUT = 120.0
OPTION = re.compile(r"--[a-z][a-z0-9-]*")


def options_in(text: str) -> set[str]:
    """The `--options` a `--help` text (or the server's source) names."""
    return set(OPTION.findall(text))


def server_help(python: Path) -> str:
    """`python -m mlx_lm.server --help` of a runtime python, in the environment the server
    itself gets (this process's); UserError when it cannot run."""
    command = [str(python), "-m", "mlx_lm.server", "--help"]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=HELP_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise UserError(f"cannot run {python} -m mlx_lm.server --help: {error}") from None
    if result.returncode != 0:
        last = (result.stderr.strip() or result.stdout.strip() or "no output").splitlines()[-1]
        raise UserError(
            f"{python} cannot run mlx_lm.server (is the checkout installed? run setup-repo): "
            + last
        )
    return result.stdout


def server_options(python: Path) -> set[str]:
    """The options the server's `--help` lists."""
    return options_in(server_help(python))

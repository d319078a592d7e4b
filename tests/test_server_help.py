"""The one reader of the server's --help: the options of the patched server, or one clear
line when a python cannot run it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mlx_local.errors import UserError
from mlx_local.server_help import options_in, server_options
from tests.conftest import PatchedRuntime


def test_a_python_without_mlx_lm_is_one_line_naming_setup_repo(tmp_path: Path) -> None:
    venv = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    with pytest.raises(UserError) as raised:
        server_options(venv / "bin" / "python")
    message = str(raised.value)
    assert "\n" not in message and "run setup-repo" in message
    assert "No module named 'mlx_lm'" in message


def test_options_in_reads_help_text() -> None:
    text = "usage: server [-h] [--model MODEL]\n  --kv-bits {2,3,4}  bits\n  -- not one\n"
    assert options_in(text) == {"--model", "--kv-bits"}


@pytest.mark.slow
def test_the_patched_server_lists_the_queue_options(patched_runtime: PatchedRuntime) -> None:
    options = server_options(patched_runtime.python)
    assert {"--allowed-hosts", "--api-key", "--served-model-name", "--kv-bits"} <= options

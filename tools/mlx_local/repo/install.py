"""Installing the checkout editable into the runtime python, and verifying its server."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

from packaging.version import Version

from ..errors import UserError
from ..server_help import server_options
from . import upstream
from .absorption import server_defines
from .checkout import checkout_base

BACKENDS = ("auto", "cpu", "metal", "cuda12", "cuda13")
# mlx 0.32 made streams per thread; servers before mlx-lm 0.31.3 then fail in their
# generation thread ("There is no Stream(cpu, 0) in current thread") and requests hang.
MLX_BOUNDS = ((Version("0.31.3"), "mlx<0.32"),)


def install_extra(backend: str) -> str:
    """The mlx-lm extra that brings the right mlx for this platform."""
    if backend == "auto":
        mac = platform.system() == "Darwin" and platform.machine() == "arm64"
        return "" if mac else "cpu"
    return "" if backend == "metal" else backend


def installed_origin(python: Path) -> Path | None:
    """Where `python` imports mlx_lm from, without importing it."""
    code = "import importlib.util as u; s = u.find_spec('mlx_lm'); print(s.origin if s else '')"
    result = subprocess.run([str(python), "-c", code], capture_output=True, text=True)
    origin = result.stdout.strip()
    return Path(origin).resolve() if result.returncode == 0 and origin else None


def is_installed_from(python: Path, repo: Path) -> bool:
    """Whether `python` imports mlx_lm from the checkout."""
    origin = installed_origin(python)
    return origin is not None and origin.is_relative_to(repo.resolve())


def mlx_bounds(repo: Path) -> list[str]:
    """Upper bounds on mlx that the checkout's base release needs."""
    version = upstream.tag_version(checkout_base(repo) or "")
    return [bound for below, bound in MLX_BOUNDS if version is not None and version < below]


def install_editable(python: Path, repo: Path, backend: str) -> None:
    """`pip install -e` the checkout into `python`'s environment."""
    extra = install_extra(backend)
    target = f"{repo}[{extra}]" if extra else str(repo)
    command = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    # Newer releases take their version from git (setuptools-scm), which would call the
    # patched branch a dev build and rewrite the tracked mlx_lm/_version.py: pin it to the base.
    base = upstream.tag_version(checkout_base(repo) or "")
    env = {**os.environ, "SETUPTOOLS_SCM_PRETEND_VERSION_FOR_MLX_LM": str(base or "0")}
    result = subprocess.run(
        [*command, "-e", target, *mlx_bounds(repo)], capture_output=True, text=True, env=env
    )
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise UserError(f"pip install -e {target} failed: {' | '.join(tail)}")
    if not is_installed_from(python, repo):
        origin = installed_origin(python)
        raise UserError(f"after installing, {python} still imports mlx_lm from {origin}")


def verify_server_options(python: Path, options: list[str]) -> None:
    """Check that the installed server provides every `Provides:` item of the patches: each
    option in its --help, each endpoint ("/v1/...") routed in its server.py."""
    shown = server_options(python)
    missing = [o for o in options if not o.startswith("/") and o not in shown]
    if missing:
        raise UserError(f"the server's --help lacks {', '.join(missing)} after patching")
    endpoints = [o for o in options if o.startswith("/")]
    origin = installed_origin(python) if endpoints else None
    source = (origin.parent / "server.py").read_text() if origin else ""
    unrouted = [e for e in endpoints if not server_defines(source, e)]
    if unrouted:
        raise UserError(f"the server does not route {', '.join(unrouted)} after patching")

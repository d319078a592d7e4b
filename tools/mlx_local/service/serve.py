"""`serve`: check the setup, pick the model, then become the server (exec keeps the pid)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..config import Config
from ..errors import UserError
from ..plan import guard
from ..plan.estimate import Verdict
from ..project import Project
from . import cluster, exposure, group_disk, kv_check, logs, process
from .command import (
    Model,
    ServerCommand,
    build_command,
    checkout_sources,
    patch_option_problem,
    queued_options,
    resolve_model,
    upstream_option_problem,
)

HUB_TIMEOUT = 5.0


def check_runtime(project: Project, python: Path) -> None:
    """Fail with one line when the checkout is not set up or its mlx-lm is not installed."""
    if not project.checkout_dir.is_dir():
        raise UserError(f"{project.checkout_dir} does not exist: run setup-repo first")
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('mlx_lm') is None)"
    try:
        found = subprocess.run([str(python), "-c", probe], timeout=60).returncode == 0
    except OSError:
        found = False
    if not found:
        raise UserError(f"{python} has no mlx_lm installed: run setup-repo")


def hub_status(repo_id: str) -> str:
    """Where a hub model stands: "cached" (in the local Hugging Face cache), "online" (on the
    hub), "missing" (the hub says there is no such model) or "unreachable" (offline)."""
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
        return "cached"
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return "unreachable"
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    try:
        with urllib.request.urlopen(f"{endpoint}/api/models/{repo_id}", timeout=HUB_TIMEOUT):
            return "online"
    except urllib.error.HTTPError as error:
        return "missing" if error.code in (401, 404) else "unreachable"
    except (urllib.error.URLError, OSError, ValueError):
        return "unreachable"


def demo_model(project: Project) -> Model:
    """The demo model under local-models/, built first if it is not there yet or is an older
    build than the shipped one (e.g. the earlier random-weight model)."""
    from ..models import demo_model as demo

    path = project.models_dir / demo.DEFAULT_NAME
    if not demo.is_current(path):
        from ..locking import project_lock

        with project_lock(project.state_dir, "demo-model"):
            demo.build_demo_model(path, force=True)
    return Model(demo.DEFAULT_NAME, "local", path.resolve())


@dataclass
class Plan:
    """What `serve` (or `start`) will run, and the warnings to show first."""

    command: ServerCommand
    warnings: list[str] = field(default_factory=list)
    verdict: Verdict | None = None  # the memory plan's one line (fits / tight / does not fit)


def plan(
    project: Project,
    config: Config,
    python: Path,
    model_override: str | None = None,
    fallback_demo: bool = False,
) -> Plan:
    """Check everything a server start needs and build its command line."""
    check_runtime(project, python)
    config = group_disk.settle(config, project)
    warnings = exposure.check(config)
    model = resolve_model(model_override or config.model, project)
    if model.kind == "hub":
        status = hub_status(model.spec)
        if status == "missing":
            raise UserError(f"model {model.spec!r} does not exist on the Hugging Face hub")
        if status == "unreachable":
            if not fallback_demo:
                raise UserError(
                    f"model {model.spec!r} is not in the local Hugging Face cache and the hub "
                    "cannot be reached; convert a local model or pass --fallback-demo"
                )
            demo = demo_model(project)
            warnings.append(
                f"the hub is unreachable and {model.spec!r} is not cached: serving the demo "
                f"model {demo.path} instead (it only knows a few scripted answers)"
            )
            model = demo
    reading = guard.read_model(model)
    warnings += kv_check.check(config, python, model, reading)
    command = build_command(config, project, python, model)
    known = checkout_sources(project)  # server.py and the patches' modules, read once
    problem = upstream_option_problem(command, known)
    if problem is None and known:
        problem = patch_option_problem(command, known, queued_options(project))
    if problem:
        raise UserError(problem)
    verdict = guard.config_verdict(config, model, reading)
    if config.distributed is not None:
        command = cluster.launch_command(project, config.distributed, python, command)
    return Plan(command, warnings, verdict)


def curl_example(host: str, port: int, served_name: str, with_key: bool) -> str:
    """A curl command line that asks the server for a short chat completion."""
    body = json.dumps(
        {
            "model": served_name,
            "messages": [{"role": "user", "content": "Hello"}],
            "max_tokens": 64,
        }
    )
    auth = ' -H "Authorization: Bearer $MLX_LM_API_KEY"' if with_key else ""
    return (
        f"curl -s {process.base_url(host, port)}/v1/chat/completions "
        f"-H 'Content-Type: application/json'{auth} -d '{body}'"
    )


def _announce(host: str, port: int, lines: list[str], server_pid: int) -> None:
    """Wait for /health, then print `lines`; give up when the server dies."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while True:
        try:
            os.kill(server_pid, 0)
        except ProcessLookupError:
            return
        if process.healthy(host, port, timeout=1.0):
            sys.stdout.write("\n".join(lines) + "\n")
            sys.stdout.flush()
            return
        time.sleep(0.5)


def _in_grandchild(job: Callable[[], None]) -> None:
    """Run `job` in a detached grandchild (no zombie is left for the server to reap)."""
    child = os.fork()
    if child == 0:
        try:
            if os.fork() == 0:
                job()
        finally:
            os._exit(0)
    os.waitpid(child, 0)


def exec_server(
    command: ServerCommand,
    log: logs.RotatingLog | None = None,
    announce: tuple[str, int, list[str]] | None = None,
) -> None:
    """Replace this process with the server (same pid, so signals reach the server).

    With `log`, a helper process copies the server's output into the rotating log. With
    `announce` (host, port, lines), a helper prints the lines once /health answers.
    """
    env = {**os.environ, **command.env, "PYTHONUNBUFFERED": "1"}
    sys.stdout.flush()
    sys.stderr.flush()
    server_pid = os.getpid()
    if log is not None:
        read_end, write_end = os.pipe()

        def copy_output() -> None:
            for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                signal.signal(signum, signal.SIG_IGN)
            os.close(write_end)
            logs.pump(read_end, log)

        _in_grandchild(copy_output)
        log.close()
        os.close(read_end)
        os.dup2(write_end, 1)
        os.dup2(write_end, 2)
        os.close(write_end)
    if announce is not None:
        host, port, lines = announce
        _in_grandchild(lambda: _announce(host, port, lines, server_pid))
    os.execve(command.argv[0], command.argv, env)

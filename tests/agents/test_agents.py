"""The real coding agents against the real server (issue 19): Claude Code (`claude -p`, the
Messages API), Codex (`codex exec`, the Responses API), OpenCode (`opencode run`) and Qwen Code
(`qwen -p`, both chat completions), pinned in tests/agents/package.json and installed with npm
into .cache/agents/. Each is set up exactly as `mlx-local connect AGENT` (and the README) says,
completes a turn, and a second session in the same project reuses the prompt cache.

The agents reach only the server: a home folder of their own, and a proxy for everything but
127.0.0.1 that refuses all and notes where they tried to go (the test asserts that their
tested setups, which turn telemetry, update checks and downloads off, try nowhere else). A
recording proxy in front of the server keeps what they send (tests/agents/recorder.py). Per
agent the test prints the prompt tokens of the first session's main request and the tokens the
second session processed, and writes them to .cache/agents/numbers.json."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest

from mlx_local.service import connect
from tests.agents import install
from tests.agents.model import WORD, one_word_model
from tests.agents.recorder import Exchange, Recorder, recording_proxy, refusing_proxy
from tests.conftest import PatchedRuntime
from tests.helpers import running_server

pytestmark = pytest.mark.slow

KEY = "test-key-agents"
SERVED = "mlx-local"
PROMPT = "Hello"
TURN_TIMEOUT = 300
KNOWN_OUTSIDE = {"OpenCode": {"registry.npmjs.org:443"}}
"""Where an agent still tries to go with its tested setup, refused by the proxy: OpenCode
1.18.33 installs @opencode-ai/plugin into its config folder in the background (it warns in its
log when that fails, and the turn goes on)."""


@dataclass(frozen=True)
class Agent:
    """An agent under test: its `connect` setup, how it runs one prompt, its API path."""

    name: str
    setup: str
    one_shot: tuple[str, ...]
    path: str


AGENTS = [
    Agent("Claude Code", "claude", ("-p", PROMPT), "/v1/messages"),
    Agent("Codex", "codex", ("exec", PROMPT), "/v1/responses"),
    Agent("OpenCode", "opencode", ("run", PROMPT), "/v1/chat/completions"),
    Agent("Qwen Code", "qwen", ("-p", PROMPT), "/v1/chat/completions"),
]
NUMBERS: dict[str, dict] = {}


def _claude_sends(exchange: Exchange) -> bool:
    """`?beta=true` on the path, the Anthropic key header, and the billing-header system block
    that changes between sessions (the server leaves it out of the prompt)."""
    system = exchange.body["system"]
    return (
        exchange.path.endswith("?beta=true")
        and exchange.headers.get("x-api-key") == KEY
        and system[0]["text"].startswith("x-anthropic-billing-header:")
    )


def _codex_sends(exchange: Exchange) -> bool:
    """Stateless Responses (`store` false: the history comes back as items) with the reasoning
    carried in `encrypted_content`, and no output limit."""
    body = exchange.body
    return (
        body["store"] is False
        and "reasoning.encrypted_content" in body["include"]
        and "max_output_tokens" not in body
        and exchange.headers.get("authorization") == f"Bearer {KEY}"
    )


RELIED_ON = {"Claude Code": _claude_sends, "Codex": _codex_sends}
"""What the server's Messages and Responses code was built around, per agent (pinned)."""


@dataclass(frozen=True)
class Service:
    url: str
    recorder: Recorder
    log: Path
    outside_proxy: str
    outside: list[str]
    context: int


@pytest.fixture(scope="module")
def agents_bin() -> Path:
    try:
        return install.install()
    except install.AgentsUnavailable as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def service(
    patched_runtime: PatchedRuntime, demo_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    model = one_word_model(demo_model, tmp_path_factory.mktemp("agents") / "one-word")
    args = ["--model", str(model), "--served-model-name", SERVED]
    with ExitStack() as stack:
        url, log = stack.enter_context(
            running_server(patched_runtime.python, args, env={"MLX_LM_API_KEY": KEY})
        )
        proxy, recorder = stack.enter_context(recording_proxy(url))
        refuser, outside = stack.enter_context(refusing_proxy())
        context = json.loads((model / "config.json").read_text())["max_position_embeddings"]
        yield Service(proxy, recorder, log, refuser, outside, context)


@pytest.fixture(scope="module", autouse=True)
def _write_numbers() -> Iterator[None]:
    yield
    if NUMBERS:
        path = install.CACHE / "numbers.json"
        path.write_text(json.dumps(NUMBERS, indent=2) + "\n")
        print(f"\nagent numbers: {path}\n{json.dumps(NUMBERS, indent=2)}")


def prompt_tokens(exchange: Exchange) -> tuple[int, int]:
    """(prompt tokens, of which from the prompt cache) from the usage of any of the APIs."""
    usage = exchange.usage
    if "cache_read_input_tokens" in usage:  # Messages: input_tokens excludes the cache
        cached = usage["cache_read_input_tokens"]
        return usage["input_tokens"] + cached, cached
    if "input_tokens_details" in usage:  # Responses
        return usage["input_tokens"], usage["input_tokens_details"]["cached_tokens"]
    return usage["prompt_tokens"], usage["prompt_tokens_details"]["cached_tokens"]


def agent_env(agent: Agent, service: Service, home: Path, bin_dir: Path) -> dict[str, str]:
    """The agent's tested setup (files under `home`, its environment), and a home folder of
    its own and a proxy that refuses all but 127.0.0.1 (no other isolation)."""
    port = int(service.url.rsplit(":", 1)[1])
    target = connect.Target("127.0.0.1", port, SERVED, service.context)
    setup = connect.setup(agent.setup, target, key=KEY)
    if setup.files:
        connect.write_files(setup, home)
    node_dir = Path(shutil.which("node") or "/usr/bin/node").parent
    path = os.pathsep.join([str(bin_dir), str(node_dir), "/usr/bin", "/bin"])
    env = {"PATH": path, "HOME": str(home), "LANG": "C.UTF-8", "TERM": "dumb"}
    proxies = {"HTTPS_PROXY": service.outside_proxy, "HTTP_PROXY": service.outside_proxy}
    return {**env, **proxies, "NO_PROXY": "127.0.0.1,localhost", connect.KEY_ENV: KEY, **setup.env}


def run_session(agent: Agent, env: dict[str, str], project: Path, bin_dir: Path) -> str:
    """One session of the agent in `project`: one prompt, to its end; returns its output."""
    setup = connect.setup(agent.setup, connect.Target())
    command = [str(bin_dir / setup.command[0]), *setup.command[1:], *agent.one_shot]
    result = subprocess.run(
        command,
        cwd=project,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=TURN_TIMEOUT,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{agent.name} exited {result.returncode}:\n{output[-3000:]}"
    assert "assumes a context window" not in output  # Claude Code: it got the model's context
    return result.stdout


def main_request(exchanges: list[Exchange]) -> Exchange:
    """The session's turn: its longest prompt (OpenCode first asks for a title)."""
    return max(exchanges, key=lambda e: prompt_tokens(e)[0])


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A small git project the agent works in."""
    root = tmp_path / "project"
    root.mkdir()
    (root / "README.md").write_text("# demo\n\nA project for the agent tests.\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run([*git, "init", "-q"], cwd=root, check=True)
    subprocess.run([*git, "add", "."], cwd=root, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "start"], cwd=root, check=True)
    return root


@pytest.mark.parametrize("agent", AGENTS, ids=[a.setup for a in AGENTS])
def test_agent_completes_turns_and_reuses_the_prompt_cache(
    agent: Agent, service: Service, agents_bin: Path, project: Path, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    env = agent_env(agent, service, home, agents_bin)
    sessions = []
    service.outside.clear()
    for _ in range(2):
        service.recorder.clear()
        output = run_session(agent, env, project, agents_bin)
        sessions.append((output, list(service.recorder.exchanges)))

    for output, exchanges in sessions:
        assert WORD in output, output
        assert exchanges, f"{agent.name} sent nothing"
        wrong = [(e.method, e.path, e.status) for e in exchanges if e.status != 200]
        assert not wrong, f"{agent.name}: {wrong}"
        assert {e.path.split("?")[0] for e in exchanges} == {agent.path}
    first = main_request(sessions[0][1])
    second = main_request(sessions[1][1])
    relied_on = RELIED_ON.get(agent.name)
    if relied_on:
        assert relied_on(first), f"{agent.name} no longer sends what the server relies on"
    first_prompt, _ = prompt_tokens(first)
    second_prompt, second_cached = prompt_tokens(second)
    NUMBERS[agent.name] = {
        "first_prompt_tokens": first_prompt,
        "second_prompt_tokens": second_prompt,
        "second_processed_tokens": second_prompt - second_cached,
        "requests_per_session": [len(s[1]) for s in sessions],
        "path": first.path,
        "user_agent": first.headers.get("user-agent"),
        "refused_outside": sorted(set(service.outside)),
    }
    print(f"\n{agent.name}: {NUMBERS[agent.name]}")
    assert second_cached >= 0.9 * second_prompt, NUMBERS[agent.name]
    assert set(service.outside) <= KNOWN_OUTSIDE.get(agent.name, set()), service.outside

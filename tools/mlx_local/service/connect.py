"""mlx-local connect AGENT: the setup of a coding agent (Claude Code, Codex, OpenCode, Qwen Code,
and any agent of the OpenAI chat API) that points it at the service.

One generator for the README's setups and for the tests that run the real agents
(tests/agents/), so the two cannot drift. A setup is environment variables, a config file
under the home folder, and the command that starts the agent. The API key never appears in
it: every setup reads it from MLX_LOCAL_API_KEY (any text when the service has no key)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..atomic import write_atomic
from ..errors import UserError

KEY_ENV = "MLX_LOCAL_API_KEY"
KEY_REF = f"${KEY_ENV}"
"""What a printed setup puts where the key goes: the shell expands it."""
AGENTS = ("claude", "codex", "opencode", "qwen", "openai-chat")


@dataclass(frozen=True)
class Target:
    """Where the service answers, and under which model id."""

    host: str = "127.0.0.1"
    port: int = 8000
    served_id: str = "mlx-local"
    context: int | None = None
    """The model's context, when known (a local model folder's config.json)."""

    @property
    def base_url(self) -> str:
        """The URL a client on this machine uses (a wildcard bind is reached on loopback)."""
        host = {"0.0.0.0": "127.0.0.1", "::": "[::1]"}.get(self.host, self.host)
        host = f"[{host}]" if ":" in host and not host.startswith("[") else host
        return f"http://{host}:{self.port}"


@dataclass(frozen=True)
class Setup:
    """What an agent needs: environment, files (path relative to the home folder: content),
    and the command that runs it."""

    agent: str
    env: dict[str, str] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    command: tuple[str, ...] = ()


def setup(agent: str, target: Target, key: str = KEY_REF) -> Setup:
    """The tested setup of `agent` for `target`; `key` is what stands where the key goes."""
    if agent == "claude":
        env = {
            "ANTHROPIC_BASE_URL": target.base_url,
            "ANTHROPIC_API_KEY": key,
            "ANTHROPIC_MODEL": target.served_id,
            "ANTHROPIC_DEFAULT_HAIKU_MODEL": target.served_id,
            "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        }
        if target.context:  # else it assumes 1M tokens for a model it does not know
            env["CLAUDE_CODE_MAX_CONTEXT_TOKENS"] = str(target.context)
        return Setup(agent, env=env, command=("claude",))
    if agent == "codex":
        return Setup(agent, files={".codex/config.toml": _codex_toml(target)}, command=("codex",))
    if agent == "opencode":
        env = {"OPENCODE_DISABLE_MODELS_FETCH": "1"}  # no catalog from models.dev
        files = {".config/opencode/opencode.json": _opencode_json(target)}
        return Setup(agent, env=env, files=files, command=("opencode",))
    if agent in ("qwen", "openai-chat"):
        env = {
            "OPENAI_BASE_URL": f"{target.base_url}/v1",
            "OPENAI_API_KEY": key,
            "OPENAI_MODEL": target.served_id,
        }
        if agent == "openai-chat":
            return Setup(agent, env=env, command=("your agent",))
        # Qwen Code sends usage statistics to Alibaba Cloud's RUM unless told not to.
        settings = {"privacy": {"usageStatisticsEnabled": False}}
        files = {".qwen/settings.json": json.dumps(settings, indent=2) + "\n"}
        return Setup(agent, env=env, files=files, command=("qwen", "--auth-type", "openai"))
    raise UserError(f"unknown agent {agent!r}; choose one of: {', '.join(AGENTS)}")


def _codex_toml(target: Target) -> str:
    name = target.served_id
    return (
        f'model = "{name}"\n'
        f'model_provider = "mlx-local"\n'
        "check_for_update_on_startup = false\n"
        "\n"
        "[model_providers.mlx-local]\n"
        'name = "mlx-local"\n'
        f'base_url = "{target.base_url}/v1"\n'
        f'env_key = "{KEY_ENV}"\n'
        'wire_api = "responses"\n'
        "\n"
        "[features]\n"
        "plugins = false  # else it fetches plugins from github.com and chatgpt.com\n"
        "\n"
        "[analytics]\n"
        "enabled = false\n"
    )


def _opencode_json(target: Target) -> str:
    name = target.served_id
    config = {
        "$schema": "https://opencode.ai/config.json",
        "provider": {
            "mlx-local": {
                "npm": "@ai-sdk/openai-compatible",
                "name": "mlx-local",
                "options": {"baseURL": f"{target.base_url}/v1", "apiKey": f"{{env:{KEY_ENV}}}"},
                "models": {name: {"name": name}},
            }
        },
        "model": f"mlx-local/{name}",
        "autoupdate": False,
        "share": "disabled",
    }
    return json.dumps(config, indent=2) + "\n"


def render(config: Setup) -> str:
    """The setup as the README shows it and `mlx-local connect` prints it: shell lines for
    the environment, each file after a comment with its path, then the command."""
    lines = [f'export {name}="{value}"' for name, value in config.env.items()]
    for path, content in config.files.items():
        lines += [f"# ~/{path}", *content.splitlines()]
    lines.append(f"# then: {' '.join(config.command)}")
    return "\n".join(lines) + "\n"


def write_files(config: Setup, home: Path) -> list[Path]:
    """Write the setup's files under `home`: new files, or files that already say the same;
    a file that says something else is left alone (one clear error)."""
    if not config.files:
        raise UserError(
            f"{config.agent} is set up by environment variables, not a file: "
            f'eval "$(mlx-local connect {config.agent})"'
        )
    written = []
    for relative, content in config.files.items():
        path = home / relative
        if path.exists() and path.read_text() != content:
            raise UserError(f"{path} exists and differs; merge `mlx-local connect {config.agent}`")
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, content)
        written.append(path)
    return written

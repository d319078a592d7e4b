"""The one settings file: committed defaults, the user's copy, validation, atomic writes.

`service/config.default.toml` holds the defaults; `config.toml` at the project root is the
user's copy (git-ignored, created from the defaults on first use). A key the user leaves out
falls back to the default. Every top-level key maps to one option of the patched
`mlx_lm.server` (the API key travels in the environment, not on the command line); the
`[service]` table holds what the service itself needs (logs, timeouts). Unknown keys and bad
values are errors that name the key, the value and what is allowed.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import config_distributed
from .atomic import write_atomic
from .errors import UserError
from .project import Project

API_KEY_ENV = "MLX_LM_API_KEY"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
KV_BITS = (2, 3, 4, 6, 8)
KV_GROUP_SIZES = (32, 64, 128)
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

Check = Callable[[Any], str | None]
"""Returns None when the value is allowed, else a description of what is allowed."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _int(minimum: int | None = None, maximum: int | None = None) -> Check:
    def check(value: Any) -> str | None:
        ok = _is_int(value)
        ok = ok and (minimum is None or value >= minimum) and (maximum is None or value <= maximum)
        if ok:
            return None
        if maximum is not None:
            return f"an integer from {minimum} to {maximum}"
        return f"an integer >= {minimum}"

    return check


def _number(minimum: float, maximum: float | None = None, *, open_min: bool = False) -> Check:
    def check(value: Any) -> str | None:
        ok = _is_number(value) and (value > minimum if open_min else value >= minimum)
        ok = ok and (maximum is None or value <= maximum)
        if ok:
            return None
        low = f"> {minimum}" if open_min else f">= {minimum}"
        return f"a number {low}" + (f" and <= {maximum}" if maximum is not None else "")

    return check


def _choice(choices: tuple[Any, ...]) -> Check:
    def check(value: Any) -> str | None:
        if value in choices and type(value) is type(choices[0]):
            return None
        return "one of " + ", ".join(json.dumps(c) for c in choices)

    return check


def _text(pattern: re.Pattern[str] | None = None, what: str = "a non-empty string") -> Check:
    def check(value: Any) -> str | None:
        if isinstance(value, str) and value.strip() and (pattern is None or pattern.match(value)):
            return None
        return what

    return check


_BYTES = re.compile(r"^\s*\d+\s*[kmgtKMGT]?i?[bB]?\s*$")


def _byte_count(value: Any) -> str | None:
    if (_is_int(value) and value >= 1) or (isinstance(value, str) and _BYTES.match(value)):
        return None
    return 'a byte count: an integer, or a string like "512M" or "10G"'


_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_bytes(value: int | str) -> int:
    """A byte count from a checked value: an integer, or "512M", "10G" (powers of 1024)."""
    if isinstance(value, int):
        return value
    match = re.fullmatch(r"\s*(\d+)\s*([kmgt]?)i?b?\s*", value.lower())
    if match is None:
        raise ValueError(f"not a byte count: {value!r}")
    return int(match.group(1)) * _UNITS[match.group(2)]


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*$")
_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600}


def _duration_or_off(value: Any) -> str | None:
    if value is False or (_is_number(value) and value > 0):
        return None
    match = _DURATION.match(value) if isinstance(value, str) else None
    if match and float(match.group(1)) > 0:
        return None
    return 'a duration like "90s", "30m" or "2h" (or seconds), or false to turn it off'


def parse_duration(value: int | float | str) -> float:
    """Seconds from a checked duration: a number of seconds, or "90s", "30m", "2h"."""
    if isinstance(value, int | float):
        return float(value)
    match = _DURATION.match(value)
    if match is None:
        raise ValueError(f"not a duration: {value!r}")
    return float(match.group(1)) * _SECONDS[match.group(2)]


def _folder_or_off(value: Any) -> str | None:
    if value is False or (isinstance(value, str) and value.strip()):
        return None
    return "a folder path, or false to turn it off"


def _bool(value: Any) -> str | None:
    return None if isinstance(value, bool) else "true or false"


def _list_of(pattern: re.Pattern[str], what: str) -> Check:
    def check(value: Any) -> str | None:
        items = value if isinstance(value, list) else [None]
        if all(isinstance(v, str) and pattern.fullmatch(v) for v in items):
            return None
        return f"a list of {what}"

    return check


# "*", or scheme://host with an optional :port or :* (any port); hosts may be [IPv6] literals.
_ORIGIN = re.compile(
    r"^(\*|[a-z][a-z0-9+.-]*://(\[[0-9a-f:.]+\]|[a-z0-9_.-]+)(:(\d+|\*))?)$", re.IGNORECASE
)
_HOST_NAME = re.compile(r"^(\*|\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.:-]+)$")


def _table(value: Any) -> str | None:
    if not isinstance(value, dict):
        return "a TOML table, e.g. [chat_template_args] with enable_thinking = false"
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return "a table of strings, numbers, booleans, arrays and tables (it becomes JSON)"
    return None


@dataclass(frozen=True)
class Key:
    """One allowed key: how to check it and which server option it becomes."""

    check: Check
    flag: str | None
    help: str


# Top-level keys: each is one option of the patched `mlx_lm.server` (api_key*: an env variable).
SERVER_KEYS: dict[str, Key] = {
    "model": Key(
        _text(), "--model", "folder under local-models/, a path, or a Hugging Face hub id"
    ),
    "host": Key(_text(), "--host", "address to listen on"),
    "port": Key(_int(1, 65535), "--port", "TCP port"),
    "allowed_origins": Key(
        _list_of(_ORIGIN, 'origins like "http://localhost:*" (any port) or "*" (any page)'),
        "--allowed-origins",
        "web pages (by origin) that may call the server from a browser",
    ),
    "allowed_hosts": Key(
        _list_of(_HOST_NAME, 'host names or addresses like "mymac.local", or "*"'),
        "--allowed-hosts",
        "Host header names accepted besides localhost, loopback addresses and host",
    ),
    "listen_backlog": Key(
        _int(1, 65535), "--listen-backlog", "connections waiting to be accepted (bursts)"
    ),
    "served_model_name": Key(
        _text(re.compile(r"^\S+$"), "a non-empty string without spaces"),
        "--served-model-name",
        "the model id clients use",
    ),
    "max_tokens": Key(_int(1), "--max-tokens", "default maximum tokens per response"),
    "prompt_cache_size": Key(_int(1), "--prompt-cache-size", "KV caches kept for reuse"),
    "prompt_cache_bytes": Key(
        _byte_count, "--prompt-cache-bytes", "byte budget of the in-memory prompt cache"
    ),
    "kv_bits": Key(_choice(KV_BITS), "--kv-bits", "quantize the KV cache to this many bits"),
    "kv_group_size": Key(_choice(KV_GROUP_SIZES), "--kv-group-size", "KV quantization group"),
    "quantized_kv_start": Key(_int(0), "--quantized-kv-start", "tokens kept unquantized"),
    "temp": Key(_number(0), "--temp", "default sampling temperature"),
    "top_p": Key(_number(0, 1, open_min=True), "--top-p", "default nucleus sampling top-p"),
    "top_k": Key(_int(0), "--top-k", "default top-k (0 disables it)"),
    "min_p": Key(_number(0, 1), "--min-p", "default min-p (0 disables it)"),
    "prompt_cache_dir": Key(
        _folder_or_off,
        "--prompt-cache-dir",
        "keep prompt caches on disk here (relative: to the project); false turns it off",
    ),
    "prompt_cache_dir_bytes": Key(
        _byte_count, "--prompt-cache-dir-bytes", "byte budget of prompt_cache_dir"
    ),
    "idle_unload": Key(
        _duration_or_off,
        "--idle-unload",
        "give the model's memory back after this long without a request; false = never",
    ),
    "chat_template_args": Key(_table, "--chat-template-args", "arguments for the chat template"),
    "thinking_budget": Key(
        _int(0),
        "--thinking-budget",
        "tokens a response may spend in its reasoning block before the server closes it",
    ),
    "chat_template": Key(_text(), "--chat-template", "a chat template instead of the model's"),
    "use_default_chat_template": Key(_bool, "--use-default-chat-template", "tokenizer default"),
    "trust_remote_code": Key(_bool, "--trust-remote-code", "trust the tokenizer's remote code"),
    "adapter_path": Key(
        _text(), "--adapter-path", "trained adapter weights (relative: to the project)"
    ),
    "draft_model": Key(_text(), "--draft-model", "model for speculative decoding"),
    "num_draft_tokens": Key(_int(1), "--num-draft-tokens", "tokens drafted per step"),
    "decode_concurrency": Key(_int(1), "--decode-concurrency", "requests decoded in parallel"),
    "prompt_concurrency": Key(_int(1), "--prompt-concurrency", "prompts processed in parallel"),
    "log_level": Key(_choice(LOG_LEVELS), "--log-level", "server log level"),
    "api_key": Key(_text(), None, f"API key clients must send (passed as ${API_KEY_ENV})"),
    "api_key_env": Key(
        _text(_ENV_NAME, "an environment variable name like MY_API_KEY"),
        None,
        "name of an environment variable that holds the API key",
    ),
    "api_key_stored": Key(
        _bool, None, "the key `mlx-local key set` keeps in the Keychain or a systemd credential"
    ),
}

# The [service] table: settings of mlx-local's service itself, not of the server.
SERVICE_KEYS: dict[str, Key] = {
    "log_dir": Key(_text(), None, "folder for the server's logs (relative to the project)"),
    "log_max_mb": Key(_int(1, 10_000), None, "rotate the log at this size"),
    "log_backups": Key(_int(1, 100), None, "rotated logs kept"),
    "start_timeout": Key(_number(0, open_min=True), None, "seconds `start` waits for /health"),
    "stop_timeout": Key(_number(0, open_min=True), None, "seconds before SIGTERM becomes SIGKILL"),
}

REQUIRED = ("model", "host", "port", "served_model_name")
# Keys holding a local path: a relative one is taken from the project root, so the server
# finds the same folder whatever directory `serve` is started from.
PATH_KEYS = ("prompt_cache_dir", "adapter_path")


@dataclass(frozen=True)
class ServiceSettings:
    """The [service] table, validated."""

    log_dir: Path
    log_max_mb: int
    log_backups: int
    start_timeout: float
    stop_timeout: float

    @property
    def log_file(self) -> Path:
        """The server's log (rotated to log_file.1, .2, ...)."""
        return self.log_dir / "server.log"


@dataclass(frozen=True)
class Config:
    """A validated configuration: server options and service settings."""

    path: Path
    options: dict[str, Any]
    service: ServiceSettings
    distributed: config_distributed.Distributed | None = None
    notes: tuple[str, ...] = ()  # settings without effect (`config check` shows them)
    explicit: frozenset[str] = frozenset()  # top-level keys the user's file sets off default

    @property
    def model(self) -> str:
        return self.options["model"]

    @property
    def host(self) -> str:
        return self.options["host"]

    @property
    def port(self) -> int:
        return self.options["port"]

    @property
    def served_model_name(self) -> str:
        return self.options["served_model_name"]


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except tomllib.TOMLDecodeError as error:
        raise UserError(f"{path} is not valid TOML: {error}") from None
    except OSError as error:
        raise UserError(f"cannot read {path}: {error.strerror}") from None


def _unknown(name: str, allowed: dict[str, Key], where: str) -> str:
    close = difflib.get_close_matches(name.split(".")[-1], list(allowed), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown key {name!r}{hint}; allowed {where}: {', '.join(allowed)}"


def _check_table(data: dict[str, Any], keys: dict[str, Key], prefix: str) -> list[str]:
    problems = []
    for name, value in data.items():
        full = prefix + name
        key = keys.get(name)
        if key is None:
            where = f"in [{prefix.rstrip('.')}]" if prefix else "at the top level"
            problems.append(_unknown(full, keys, where))
            continue
        allowed = key.check(value)
        if allowed is not None:
            shown = json.dumps(value) if not isinstance(value, dict) else "a table"
            problems.append(f"{full} = {shown} is not allowed; allowed: {allowed}")
    return problems


def validate(data: dict[str, Any], root: Path | None = None) -> list[str]:
    """Every problem of a merged configuration, one line each (empty when valid)."""
    top = {k: v for k, v in data.items() if k not in ("service", "distributed")}
    problems = _check_table(top, SERVER_KEYS, "")
    service = data.get("service", {})
    if isinstance(service, dict):
        problems += _check_table(service, SERVICE_KEYS, "service.")
    else:
        problems.append("service must be a table: [service]")
    problems += [f"{key} is missing; it is required" for key in REQUIRED if key not in data]
    key_sources = [k for k in ("api_key", "api_key_env") if k in data]
    key_sources += ["api_key_stored"] if data.get("api_key_stored") else []
    if len(key_sources) > 1:
        together = "both" if len(key_sources) == 2 else "all"
        problems.append(
            f"{' and '.join(key_sources)} are {together} set; allowed: at most one of them"
        )
    if "kv_group_size" in data and "kv_bits" not in data:
        problems.append("kv_group_size is set without kv_bits; allowed: set kv_bits as well")
    if "distributed" in data and data.get("idle_unload", False) is not False:
        problems.append(
            "idle_unload is set but [distributed] is on: a group does not unload its model "
            "(every rank would have to unload and load again together); allowed: "
            "idle_unload = false"
        )
    if "distributed" in data:
        problems += config_distributed.validate(data["distributed"], root or Path.cwd())
        problems += config_distributed.server_problems(data)
    return problems


def merge(defaults: dict[str, Any], user: dict[str, Any]) -> dict[str, Any]:
    """User values over defaults; the [service] table merges key by key."""
    merged = {**defaults, **user}
    if isinstance(defaults.get("service"), dict) and isinstance(user.get("service"), dict):
        merged["service"] = {**defaults["service"], **user["service"]}
    return merged


def defaults_file(project: Project) -> Path:
    """The project's committed defaults, else those of this source tree (for bare test roots)."""
    if project.default_config_file.is_file():
        return project.default_config_file
    return Path(__file__).resolve().parents[2] / "service" / "config.default.toml"


def ensure_user_config(project: Project) -> bool:
    """Create config.toml from the defaults if it does not exist; True when created."""
    if project.user_config_file.exists():
        return False
    write_atomic(
        project.user_config_file, defaults_file(project).read_text("utf-8"), new_mode=0o600
    )
    return True


def load(project: Project, path: Path | None = None) -> Config:
    """The validated configuration of `project` (its config.toml, or `path`), over defaults."""
    defaults = _read_toml(defaults_file(project))
    if path is None:
        ensure_user_config(project)
        path = project.user_config_file
    user = _read_toml(path)
    data = merge(defaults, user)
    problems = validate(data, project.root)
    if problems:
        lines = "\n  ".join(problems)
        raise UserError(f"{path} has {len(problems)} problem(s):\n  {lines}")
    service = data.get("service", {})
    log_dir = Path(os.path.expanduser(service.get("log_dir", "logs")))
    settings = ServiceSettings(
        log_dir=log_dir if log_dir.is_absolute() else project.root / log_dir,
        log_max_mb=service.get("log_max_mb", 10),
        log_backups=service.get("log_backups", 3),
        start_timeout=float(service.get("start_timeout", 120)),
        stop_timeout=float(service.get("stop_timeout", 15)),
    )
    options = {k: v for k, v in data.items() if k not in ("service", "distributed")}
    if options.get("prompt_cache_dir", False) is False:  # a budget of nothing: no effect
        options.pop("prompt_cache_dir_bytes", None)
    if "prompt_cache_bytes" in options:  # upstream's parser knows neither K nor T nor 1024s
        options["prompt_cache_bytes"] = parse_bytes(options["prompt_cache_bytes"])
    if options.get("idle_unload", False) is False:
        options.pop("idle_unload", None)
    else:  # the server takes seconds
        seconds = parse_duration(options["idle_unload"])
        options["idle_unload"] = int(seconds) if seconds.is_integer() else seconds
    for key in PATH_KEYS:
        if isinstance(options.get(key), str):
            value = Path(os.path.expanduser(options[key]))
            options[key] = str(value if value.is_absolute() else project.root / value)
    group = data.get("distributed")
    group = config_distributed.parse(group, project.root) if group is not None else None
    explicit = frozenset(k for k in options if not at_default(user, defaults, k))
    return Config(path, options, settings, group, tuple(notes(user, options)), explicit)


def at_default(user: dict[str, Any], defaults: dict[str, Any], key: str) -> bool:
    """The user's file leaves `key` at its default: absent, or the shipped value itself (what
    `config init` copies; paths compared as paths)."""
    if key not in user:
        return True
    value, default = user[key], defaults.get(key)
    if key in PATH_KEYS and isinstance(value, str) and isinstance(default, str):
        return os.path.normpath(value) == os.path.normpath(default)
    return value == default and type(value) is type(default)


def notes(user: dict[str, Any], options: dict[str, Any]) -> list[str]:
    """Keys of the user's file that have no effect on the server's options (`config check`
    shows them; never a refusal)."""
    if "prompt_cache_dir_bytes" not in user or "prompt_cache_dir_bytes" in options:
        return []
    return ["prompt_cache_dir_bytes has no effect: the disk prompt cache is off"]

"""The server's command line and environment, built from the config."""

from __future__ import annotations

import json
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..config import API_KEY_ENV, SERVER_KEYS, Config
from ..errors import UserError
from ..models.listing import model_folders
from ..models.source import HUB_ID
from ..project import Project
from ..repo import patchqueue
from ..server_help import options_in
from . import keystore

ModelKind = Literal["local", "path", "hub"]
# Server options that come from upstream releases, not from the patch queue: the first
# release that has each.
UPSTREAM_SINCE = {"--prompt-cache-bytes": "0.31.1"}


@dataclass(frozen=True)
class Model:
    """Where the configured model comes from: a local folder (`path`) or a hub id."""

    spec: str
    kind: ModelKind
    path: Path | None = None

    @property
    def argument(self) -> str:
        """The value of the server's --model."""
        return str(self.path) if self.path else self.spec


def resolve_model(spec: str, project: Project) -> Model:
    """Resolve a config `model` value: a name under local-models/, a path, or a hub id."""
    expanded = Path(os.path.expanduser(spec))
    under_models = project.models_dir / spec
    if not expanded.is_absolute() and under_models.is_dir():
        return Model(spec, "local", under_models.resolve())
    candidate = expanded if expanded.is_absolute() else project.root / expanded
    if candidate.is_dir():
        return Model(spec, "path", candidate.resolve())
    looks_like_path = spec.startswith(("/", "./", "../", "~")) or expanded.is_absolute()
    if not looks_like_path and HUB_ID.match(spec):
        return Model(spec, "hub")
    known = ", ".join(p.name for p in model_folders(project.models_dir)) or "none"
    raise UserError(
        f"model {spec!r} not found: not a folder under {project.models_dir} (there: {known}), "
        "not a path, not a hub id (org/name); build one with `convert-model` or "
        "`mlx-local demo-model`"
    )


@dataclass(frozen=True)
class ServerCommand:
    """argv and the extra environment of one server run."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    model: Model | None = None

    def display(self) -> str:
        """The command line as a shell would take it, with secrets masked."""
        prefix = [f"{name}=********" for name in sorted(self.env) if name == API_KEY_ENV]
        return " ".join(prefix + [shlex.quote(part) for part in self.argv])


def _option_args(options: dict, skip: set[str]) -> list[str]:
    args: list[str] = []
    for name, key in SERVER_KEYS.items():
        if name in skip or key.flag is None or name not in options:
            continue
        value = options[name]
        if isinstance(value, bool):
            if value:
                args.append(key.flag)
        elif isinstance(value, dict):
            args += [key.flag, json.dumps(value, separators=(",", ":"))]
        elif isinstance(value, list):
            args += [key.flag, ",".join(value)]
        else:
            args += [key.flag, str(value)]
    return args


def api_key(config: Config, environ: dict[str, str] | None = None) -> str | None:
    """The API key from the config (directly, through the named variable, or the stored one),
    else None."""
    environ = os.environ if environ is None else environ
    if "api_key" in config.options:
        return config.options["api_key"]
    if config.options.get("api_key_stored"):
        store = keystore.store()
        key = store.read()
        if key is None:
            raise UserError(
                f"api_key_stored = true but no key is stored in {store.where}: run "
                "`mlx-local key set`"
            )
        return key
    name = config.options.get("api_key_env")
    if name is None:
        return None
    if not environ.get(name):
        raise UserError(f"api_key_env = {name!r} but the environment variable {name} is not set")
    return environ[name]


def build_command(
    config: Config,
    project: Project,
    python: Path,
    model: Model | None = None,
    environ: dict[str, str] | None = None,
) -> ServerCommand:
    """The server command for `config` (with `model` instead of the configured one if given)."""
    model = model or resolve_model(config.model, project)
    argv = [str(python), "-m", "mlx_lm.server", "--model", model.argument]
    argv += _option_args(config.options, skip={"model"})  # paths made absolute by config.load
    key = api_key(config, environ)
    return ServerCommand(argv=argv, env={API_KEY_ENV: key} if key else {}, model=model)


def unsupported_flags(command: ServerCommand, help_text: str) -> list[str]:
    """The options of `command` that the server's --help does not list."""
    flags = [part for part in command.argv[3:] if part.startswith("--")]
    known = options_in(help_text)
    return [flag for flag in flags if flag not in known]


def upstream_option_problem(command: ServerCommand, known_text: str) -> str | None:
    """Why the server (whose --help or source is `known_text`) cannot take an upstream-only
    option of `command`; None when it can take them all."""
    missing = [f for f in unsupported_flags(command, known_text) if f in UPSTREAM_SINCE]
    if not missing:
        return None
    since = ", ".join(f"{flag} (mlx-lm {UPSTREAM_SINCE[flag]} and later)" for flag in missing)
    return (
        f"the mlx-lm release in mlx-lm-repo/ lacks {since}: move to a newer release with "
        "update-upstream, or remove the key from the config"
    )


def queued_options(project: Project) -> dict[str, patchqueue.SeriesEntry]:
    """Each server option a patch of the queue provides -> that patch's series entry."""
    if not project.series_file.is_file():
        return {}
    return {
        item: entry
        for entry in patchqueue.Series.load(project.series_file).entries
        for item in patchqueue.read_patch(project.patches_dir / entry.name).provides
        if item.startswith("--")
    }


def patch_option_problem(
    command: ServerCommand, known_text: str, queued: dict[str, patchqueue.SeriesEntry]
) -> str | None:
    """Why the server (whose --help or source is `known_text`) cannot take an option of
    `command` that a patch provides (`queued`, from queued_options): the patch is not applied
    there, guarded out at this base or not set up yet; None when it can take them all."""
    missing = [f for f in unsupported_flags(command, known_text) if f in queued]
    if not missing:
        return None
    flag, entry = missing[0], queued[missing[0]]
    key = next((name for name, k in SERVER_KEYS.items() if k.flag == flag), flag)
    lacks = f"the server in mlx-lm-repo/ lacks {flag} (config key {key})"
    if entry.guard is not None:
        return (
            f"{lacks}: patch {entry.name} applies to mlx-lm {entry.guard} only; move to such a "
            "release with update-upstream, or remove the key from the config"
        )
    return f"{lacks}: run setup-repo so that patch {entry.name} is applied"

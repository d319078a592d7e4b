"""mlx-local key set | show | rm: the login service's API key in the Keychain or a systemd
credential (service/keystore.py). Registered by service/cli.py."""

from __future__ import annotations

import argparse
import getpass
import secrets
import sys

from rich.console import Console

from .. import config as config_mod
from .. import project
from ..errors import UserError
from . import keystore, process

console = Console(soft_wrap=True, highlight=False)
err_console = Console(stderr=True, soft_wrap=True, highlight=False)


def register(sub: argparse._SubParsersAction) -> None:
    """Add `key set`, `key show`, `key rm`."""
    key = sub.add_parser("key", help="the API key of the login service: set, show, rm")
    actions = key.add_subparsers(dest="key_command", metavar="ACTION", required=True)
    store = actions.add_parser(
        "set", help="store or replace the key (read from stdin, or asked for twice)"
    )
    store.add_argument(
        "--generate", action="store_true", help="make a new random key and print it once"
    )
    store.set_defaults(handler=_set)
    show = actions.add_parser("show", help="where the key is kept, and the key masked")
    show.add_argument("--reveal", action="store_true", help="print the key itself (for a client)")
    show.set_defaults(handler=_show)
    actions.add_parser("rm", help="remove the stored key").set_defaults(handler=_remove)


def _read_key() -> str:
    """One line from stdin, or typed twice at a terminal (not echoed)."""
    if not sys.stdin.isatty():
        return sys.stdin.readline().strip()
    first = getpass.getpass("API key: ")
    if getpass.getpass("the same key again: ") != first:
        raise UserError("the two keys differ; nothing was stored")
    return first


def _set(args: argparse.Namespace) -> int:
    proj = project.current()
    cfg = config_mod.load(proj)
    key = f"sk-{secrets.token_urlsafe(32)}" if args.generate else keystore.validate(_read_key())
    store = keystore.store()
    store.write(key)
    if args.generate:
        print(key)  # once, for the clients; `key show --reveal` prints it again
    err_console.print(f"stored the key in {store.where}")
    if not cfg.options.get("api_key_stored"):
        err_console.print(
            f"to use it: set api_key_stored = true in {cfg.path} (instead of api_key or "
            "api_key_env), then `mlx-local restart`"
        )
    elif process.healthy(cfg.host, cfg.port):
        err_console.print("the running server still has the old key: `mlx-local restart`")
    return 0


def _show(args: argparse.Namespace) -> int:
    store = keystore.store()
    key = store.read()
    if key is None:
        raise UserError(f"no key is stored in {store.where}: `mlx-local key set`")
    if args.reveal:
        print(key)
    else:
        console.print(f"{keystore.mask(key)} in {store.where}")
    return 0


def _remove(args: argparse.Namespace) -> int:
    store = keystore.store()
    if store.remove():
        console.print(f"removed the key from {store.where}")
    else:
        console.print(f"no key is stored in {store.where}; nothing to do")
    return 0

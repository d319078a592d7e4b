"""What a login service (launchd, systemd) can run: refuse at install-service and start, in one
line, a config it could not satisfy."""

from __future__ import annotations

from ..config import Config
from ..errors import UserError
from . import keystore
from .kind import Kind


def check(config: Config, kind: Kind, key_store: bool = True) -> None:
    """Refuse api_key_env (the service does not see the shell's variables) and, with
    `key_store`, api_key_stored without a stored key."""
    name = config.options.get("api_key_env")
    if name is not None:
        raise UserError(
            f"api_key_env = {name!r} cannot reach the login service: {kind} does not pass "
            "your shell's variables; store the key with `mlx-local key set` and set "
            f"api_key_stored = true in {config.path} instead (api_key_env still works for "
            "`mlx-local serve` in a shell)"
        )
    if key_store and config.options.get("api_key_stored"):
        store = keystore.store(kind)
        if store.read() is None:
            raise UserError(
                f"api_key_stored = true but no key is stored in {store.where}: run "
                "`mlx-local key set`"
            )

"""Who can reach the server: refuse a bind beyond loopback without an API key, warn that
such a server speaks plain HTTP, and warn when a config file holding the key is readable
by others."""

from __future__ import annotations

import ipaddress
import shlex
import socket
import stat
import tomllib

from ..config import Config
from ..errors import UserError
from .command import api_key


def is_loopback(host: str) -> bool:
    """Whether listening on `host` keeps the server on this machine (localhost, 127.0.0.0/8,
    ::1, or a name that resolves only to loopback addresses)."""
    name = host.strip().strip("[]").rstrip(".").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(name, None)
    except (OSError, UnicodeError):
        return False
    addresses = {info[4][0].split("%")[0] for info in infos}
    return bool(addresses) and all(ipaddress.ip_address(a).is_loopback for a in addresses)


def key_file_warning(config: Config) -> str | None:
    """A warning when the config file holds `api_key` but users other than its owner may
    read it (it should be mode 0600)."""
    try:
        with config.path.open("rb") as handle:
            holds_key = "api_key" in tomllib.load(handle)
        mode = stat.S_IMODE(config.path.stat().st_mode)
    except (OSError, tomllib.TOMLDecodeError):
        return None
    if not holds_key or not mode & 0o077:
        return None
    return (
        f"{config.path} holds api_key but others may read it (mode {mode:04o}); "
        f"run: chmod 600 {shlex.quote(str(config.path))}"
    )


def check(config: Config) -> list[str]:
    """Refuse (UserError) a server reachable beyond this machine without an API key;
    otherwise the warnings to show once: plain HTTP beyond loopback, a readable key file."""
    warnings = []
    if not is_loopback(config.host):
        if api_key(config) is None:
            raise UserError(
                f"host = {config.host!r} would serve every machine that can reach this one, "
                f"without an API key: set api_key_env (or api_key) in {config.path}, or "
                'host = "127.0.0.1"'
            )
        warnings.append(
            f"host = {config.host!r}: the server is reachable from other machines and speaks "
            "plain HTTP; the API key and every conversation cross the network unencrypted"
        )
    if (warning := key_file_warning(config)) is not None:
        warnings.append(warning)
    return warnings

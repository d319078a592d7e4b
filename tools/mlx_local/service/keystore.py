"""The API key of the login service, kept the platform's way and never in the project: the
macOS login keychain (security(1)), or on Linux a systemd credential file, mode 0600 in the
user's credential store (~/.config/credstore), which the unit loads with LoadCredential=."""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ..atomic import write_atomic
from ..errors import UserError
from .kind import Kind, native_kind

CREDENTIAL = "mlx-local-api-key"  # the systemd credential's name (and its file's)
KEYCHAIN_SERVICE = "com.local.mlx-local"
KEYCHAIN_ACCOUNT = "api-key"
SECURITY_ENV = "MLX_LOCAL_SECURITY"  # the security tool to run (tests: the stand-in)
SECURITY = "/usr/bin/security"
ITEM_NOT_FOUND = 44  # security(1): "The specified item could not be found in the keychain."
MIN_LENGTH = 16
# What `Authorization: Bearer` can carry (RFC 6750 b64token); also safe in `security -i`.
_TOKEN = re.compile(r"^[A-Za-z0-9._~+/-]+=*$")


class KeyStore(Protocol):
    """Where the login service's key lives."""

    where: str

    def read(self) -> str | None: ...

    def write(self, key: str) -> None: ...

    def remove(self) -> bool: ...


def validate(key: str) -> str:
    """The key if a client can send it as a Bearer token and it is not short, else UserError."""
    if len(key) >= MIN_LENGTH and _TOKEN.match(key):
        return key
    raise UserError(
        f"a key needs at least {MIN_LENGTH} characters of A-Z a-z 0-9 - . _ ~ + / (and = at the "
        "end), what an `Authorization: Bearer` header carries; or use `mlx-local key set "
        "--generate`"
    )


def mask(key: str) -> str:
    """The first characters of a key and its length, never the key."""
    return f"{key[:5]}{'*' * 8} ({len(key)} characters)"


class Keychain:
    """The login keychain, through security(1): a generic password item."""

    where = f"the login keychain (service {KEYCHAIN_SERVICE}, account {KEYCHAIN_ACCOUNT})"

    def _security(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
        tool = os.environ.get(SECURITY_ENV, SECURITY)
        try:
            return subprocess.run(
                [tool, *args], input=stdin, capture_output=True, text=True, timeout=60
            )
        except OSError as error:
            raise UserError(f"cannot run {tool} (the macOS Keychain tool): {error}") from None

    def _failed(self, result: subprocess.CompletedProcess, what: str) -> UserError:
        detail = (result.stderr or result.stdout).strip().splitlines()
        return UserError(f"security {what} failed: {detail[-1] if detail else result.returncode}")

    def read(self) -> str | None:
        result = self._security(
            "find-generic-password", "-s", KEYCHAIN_SERVICE, "-a", KEYCHAIN_ACCOUNT, "-w"
        )
        if result.returncode == ITEM_NOT_FOUND:
            return None
        if result.returncode != 0:
            raise self._failed(result, "find-generic-password")
        return result.stdout.strip() or None

    def write(self, key: str) -> None:
        """Add or replace the item. The command goes through `security -i` on stdin, so the
        key never shows in a process list; the result is read back, not trusted."""
        item = f"-s {KEYCHAIN_SERVICE} -a {KEYCHAIN_ACCOUNT}"
        result = self._security("-i", stdin=f"add-generic-password -U {item} -w {validate(key)}\n")
        if self.read() != key:
            raise self._failed(result, "add-generic-password")

    def remove(self) -> bool:
        result = self._security(
            "delete-generic-password", "-s", KEYCHAIN_SERVICE, "-a", KEYCHAIN_ACCOUNT
        )
        if result.returncode == ITEM_NOT_FOUND:
            return False
        if result.returncode != 0:
            raise self._failed(result, "delete-generic-password")
        return True


@dataclass(frozen=True)
class CredentialFile:
    """A file only its owner can read, outside the project, loaded by systemd into the
    service's $CREDENTIALS_DIRECTORY (a private copy) with LoadCredential=."""

    path: Path

    @classmethod
    def default(cls) -> CredentialFile:
        config_home = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
        return cls(Path(config_home) / "credstore" / CREDENTIAL)

    @property
    def where(self) -> str:
        return str(self.path)

    def read(self) -> str | None:
        """Under systemd the service's copy of the credential, else the file itself."""
        loaded = os.environ.get("CREDENTIALS_DIRECTORY")
        path = Path(loaded) / CREDENTIAL if loaded else self.path
        try:
            return path.read_text("utf-8").strip() or None
        except FileNotFoundError:
            return None
        except OSError as error:
            raise UserError(f"cannot read the key at {path}: {error.strerror}") from None

    def write(self, key: str) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path.parent.chmod(0o700)
        write_atomic(self.path, validate(key) + "\n", new_mode=0o600)
        self.path.chmod(0o600)  # also when an older file had another mode

    def remove(self) -> bool:
        existed = self.path.is_file()
        self.path.unlink(missing_ok=True)
        return existed


def store(kind: Kind | None = None) -> KeyStore:
    """The key store of this system's login service (Keychain for launchd)."""
    return Keychain() if (kind or native_kind()) == "launchd" else CredentialFile.default()

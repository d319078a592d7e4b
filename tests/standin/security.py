"""The stand-in `security` (tests only): the generic-password commands of macOS's security(1)
that mlx-local uses, over a JSON file (mode 0600) where the login keychain would be,
~/Library/Keychains/, instead of the keychain itself, which Linux does not have.

Modelled on security(1): `add-generic-password -a ACCOUNT -s SERVICE -w PASSWORD [-U]` (without
-U an existing item is an error, exit 45), `find-generic-password -a -s [-w]` (-w prints only
the password; a missing item is exit 44), `delete-generic-password -a -s` (exit 44 when
missing), and `-i`: commands read from stdin one per line, so a password never appears in a
process list.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

NOT_FOUND = (
    44,
    "security: SecKeychainSearchCopyNext: The specified item could not be found in the keychain.",
)
EXISTS = (
    45,
    "security: SecKeychainItemCreateFromContent (<default>): The specified item already exists "
    "in the keychain.",
)


def keychain() -> Path:
    return Path(os.environ["HOME"]) / "Library" / "Keychains" / "login.keychain-standin.json"


def load() -> dict[str, str]:
    try:
        return json.loads(keychain().read_text())
    except FileNotFoundError:
        return {}


def save(items: dict[str, str]) -> None:
    path = keychain()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(items))
    tmp.chmod(0o600)
    tmp.replace(path)


def options(args: list[str]) -> tuple[dict[str, str], set[str]]:
    """-a/-s/-w values and bare flags (-U, a -w given last without a value)."""
    values: dict[str, str] = {}
    flags: set[str] = set()
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in ("-a", "-s", "-w", "-l", "-j") and i + 1 < len(args):
            values[arg] = args[i + 1]
            i += 2
        else:
            flags.add(arg)
            i += 1
    return values, flags


def run(args: list[str]) -> tuple[int, str, str]:
    """One security command: (exit code, stdout, stderr)."""
    if not args:
        return 2, "", "usage: security [-i] command [options]\n"
    command, rest = args[0], args[1:]
    values, flags = options(rest)
    item = f"{values.get('-s', '')}\0{values.get('-a', '')}"
    items = load()
    if command == "add-generic-password":
        if "-w" not in values:
            return 2, "", "security: a password is required (-w PASSWORD) in the stand-in\n"
        if item in items and "-U" not in flags:
            return EXISTS[0], "", EXISTS[1] + "\n"
        items[item] = values["-w"]
        save(items)
        return 0, "", ""
    if command in ("find-generic-password", "delete-generic-password"):
        if item not in items:
            return NOT_FOUND[0], "", NOT_FOUND[1] + "\n"
        if command == "delete-generic-password":
            del items[item]
            save(items)
            return 0, "password has been deleted.\n", ""
        if "-w" in flags:
            return 0, items[item] + "\n", ""
        return 0, f'keychain: "stand-in"\nclass: "genp"\n    "svce"<blob>="{values["-s"]}"\n', ""
    return 2, "", f"security: unknown command {command!r} in the stand-in\n"


def main() -> int:
    args = sys.argv[1:]
    if args[:1] != ["-i"]:
        code, out, err = run(args)
        sys.stdout.write(out)
        sys.stderr.write(err)
        return code
    for line in sys.stdin:
        if line.strip():
            _, out, err = run(line.split())
            sys.stdout.write(out)
            sys.stderr.write(err)
    return 0


if __name__ == "__main__":
    sys.exit(main())

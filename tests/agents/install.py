"""The pinned coding agents of tests/agents/package.json, installed with npm into
.cache/agents/ (git-ignored) and installed again only when the manifest or the lock changed.

`python -m tests.agents.install` (or `make agents`) installs them ahead of the tests.

npm installs from the committed package-lock.json (exact versions, integrity checked). It is
`npm install` in a copy of the manifest and lock, not `npm ci`: the lock cannot list the other
platforms' optional binaries (opencode-darwin-arm64, ...) that the npm registry this lock was
written against does not serve, and `npm ci` refuses a lock that misses any of them."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
CACHE = REPO_ROOT / ".cache" / "agents"
MANIFESTS = ("package.json", "package-lock.json")
STAMP = ".installed-from"
BINARIES = {"claude": "claude", "codex": "codex", "opencode": "opencode", "qwen": "qwen"}


class AgentsUnavailable(RuntimeError):
    """npm is missing or the install failed: the agent tests skip with this reason."""


def manifest_hash() -> str:
    """The hash of the committed manifest and lock: what the cached install was made from."""
    digest = hashlib.sha256()
    for name in MANIFESTS:
        digest.update((HERE / name).read_bytes())
    return digest.hexdigest()


def install(cache: Path = CACHE) -> Path:
    """The agents' bin folder (node_modules/.bin), installing them first when the cached
    install is missing or was made from another manifest or lock."""
    wanted = manifest_hash()
    stamp = cache / STAMP
    bin_dir = cache / "node_modules" / ".bin"
    if stamp.is_file() and stamp.read_text().strip() == wanted:
        return bin_dir
    npm = shutil.which("npm")
    if npm is None:
        raise AgentsUnavailable("npm is not installed (the coding agents are npm packages)")
    shutil.rmtree(cache, ignore_errors=True)
    cache.mkdir(parents=True)
    for name in MANIFESTS:
        shutil.copy(HERE / name, cache / name)
    command = [npm, "install", "--no-audit", "--no-fund", "--no-save", "--loglevel=error"]
    result = subprocess.run(command, cwd=cache, capture_output=True, text=True, timeout=900)
    missing = [name for name in BINARIES if not (bin_dir / name).exists()]
    if result.returncode != 0 or missing:
        raise AgentsUnavailable(
            f"npm install in {cache} failed (exit {result.returncode}, missing {missing}): "
            f"{result.stderr.strip()[-600:]}"
        )
    stamp.write_text(wanted + "\n")
    return bin_dir


def main() -> int:
    try:
        print(install())
    except AgentsUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

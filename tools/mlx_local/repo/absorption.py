"""Absorbed patches: whether upstream already provides a patch's options, and since when."""

from __future__ import annotations

import re
from pathlib import Path

from packaging.specifiers import SpecifierSet
from packaging.version import Version

from ..atomic import write_atomic
from . import gitutil, patchqueue


def server_defines(source: str, item: str) -> bool:
    """Whether server.py's `source` defines a `Provides:` item: an option ("--name") or an
    endpoint ("/v1/path"), each written there as a quoted string."""
    return re.search(rf"""["']{re.escape(item)}["']""", source) is not None


def provided_upstream(repo: Path, rev: str, provides: tuple[str, ...]) -> bool:
    """Whether the unpatched server at `rev` already defines every item in `provides`."""
    if not provides:
        return False
    source = gitutil.git(repo, "show", f"{rev}:mlx_lm/server.py", check=False).stdout
    return all(server_defines(source, item) for item in provides)


def absorbed_at(
    repo: Path, rev: str, patches_dir: Path, entries: list[patchqueue.SeriesEntry]
) -> dict[str, tuple[str, ...]]:
    """The entries whose every `Provides:` item the unpatched server at `rev` already has
    (name -> provides): absorbed, to be skipped whatever their guard says."""
    absorbed = {}
    for entry in entries:
        provides = patchqueue.read_patch(patches_dir / entry.name).provides
        if provided_upstream(repo, rev, provides):
            absorbed[entry.name] = provides
    return absorbed


def first_release_providing(
    repo: Path, releases: list[list[str]], provides: tuple[str, ...]
) -> str | None:
    """The oldest of `releases` ([tag, commit], oldest first) whose server has `provides`."""
    for tag, commit in releases:
        if provided_upstream(repo, commit, provides):
            return tag
    return None


def guard_below(guard: SpecifierSet | None, version: Version) -> SpecifierSet:
    """`guard` narrowed so it stops admitting `version` and later releases."""
    extra = SpecifierSet(f"<{version}")
    return extra if guard is None else guard & extra


def add_applied_upstream(patch: Path, tag: str) -> None:
    """Add `Applied-Upstream: tag` to the trailers of a patch file's commit message."""
    text = patch.read_text()
    if f"Applied-Upstream: {tag}" in text:
        return
    head, sep, rest = text.partition("\n---\n")
    write_atomic(patch, f"{head.rstrip()}\nApplied-Upstream: {tag}{sep}{rest}")

"""What the README and docs/ show: fenced blocks with their snippet marks, commands, inline code."""

from __future__ import annotations

import re
import shlex
import tomllib
from dataclasses import dataclass
from pathlib import Path

from tests.helpers import REPO_ROOT

PAGES = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
MARK = re.compile(r"<!-- snippet: ([a-z0-9-]+) -->")
CONSOLE_SCRIPTS = ("mlx-local", "setup-repo", "update-upstream", "convert-model")


@dataclass(frozen=True)
class Block:
    """One fenced block of a page: its language, its snippet mark (if any) and its text."""

    page: Path
    line: int
    language: str
    mark: str | None
    text: str

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(REPO_ROOT)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    """Every fenced block of `page`, with the snippet mark on the line before it."""
    found: list[Block] = []
    lines = page.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        fence = re.match(r"^```(\S*)\s*$", lines[i])
        if not fence:
            i += 1
            continue
        start = i
        i += 1
        while i < len(lines) and lines[i] != "```":
            i += 1
        previous = lines[start - 1] if start else ""
        mark = MARK.fullmatch(previous.strip())
        text = "\n".join(lines[start + 1 : i]) + "\n"
        found.append(Block(page, start + 1, fence[1], mark and mark[1], text))
        i += 1
    return found


def all_blocks() -> list[Block]:
    return [block for page in PAGES for block in blocks(page)]


def shell_commands(block: Block) -> list[str]:
    """The command lines of a shell block, or of a console transcript's `$ ` lines."""
    if block.language in ("sh", "bash", "shell"):
        raw = block.text.replace("\\\n", " ").splitlines()
    elif block.language in ("", "console"):
        raw = [line[2:] for line in block.text.splitlines() if line.startswith("$ ")]
    else:
        return []
    commands = []
    for line in raw:
        for part in re.split(r"&&|;", line):
            if part.strip():
                commands.append(part.strip())
    return commands


def inline_commands(page: Path) -> list[str]:
    """Inline code of the prose that is a complete command (no placeholders, no alternatives)."""
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    found = []
    for code in re.findall(r"`([^`\n]+)`", text):
        words = code.split()
        if len(words) < 2 or words[0] not in CONSOLE_SCRIPTS:
            continue
        if re.search(r"[<>\[\]|]|\.\.\.", code):
            continue
        found.append(code)
    return found


def console_argv(command: str) -> list[str] | None:
    """`mlx-local ARGS` (after env assignments, a venv path, a comment) as the argv of the
    mlx-local parser; None for other programs."""
    words = shlex.split(command, comments=True)
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):
        words = words[1:]
    if not words:
        return None
    program = Path(words[0]).name
    if program not in CONSOLE_SCRIPTS:
        return None
    return words[1:] if program == "mlx-local" else [program, *words[1:]]


def merge_onto_default(default: str, fragment: str) -> str:
    """config.toml as a user gets it: the default file `config init` writes, with the
    fragment's top-level keys replacing the default's and its tables appended."""
    keys = {k for k, v in tomllib.loads(fragment).items() if not isinstance(v, dict)}
    kept: list[str] = []
    depth = 0
    for line in default.splitlines():
        name = re.match(r"^([A-Za-z_][A-Za-z0-9_]*)\s*=", line)
        if depth or (name and name[1] in keys):
            bare = re.sub(r'"[^"]*"|#.*', "", line)
            depth += bare.count("[") - bare.count("]")
            continue
        kept.append(line)
    head, tables = _split_top(fragment)
    return head + "\n" + "\n".join(kept) + "\n" + tables


def _split_top(fragment: str) -> tuple[str, str]:
    """The fragment's top-level keys, and its tables (from the first `[table]` line)."""
    lines = fragment.splitlines()
    for i, line in enumerate(lines):
        if re.match(r"^\[[^\]]+\]", line):
            return "\n".join(lines[:i]) + "\n", "\n".join(lines[i:]) + "\n"
    return fragment, ""

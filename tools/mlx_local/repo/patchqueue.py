"""The patch queue: series parsing, guards, patch metadata, applying and exporting patches."""

from __future__ import annotations

import email.parser
import email.policy
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import Version

from ..atomic import write_atomic
from ..errors import UserError
from . import gitutil

FORMAT_PATCH_OPTIONS = (
    "--zero-commit",
    "--no-signature",
    "--no-numbered",
    "--full-index",
    "--diff-algorithm=myers",
    "--no-color",
)
# Commits made by applying patches get this committer and the author's date, so applying
# the same queue onto the same base always gives the same commit ids.
COMMITTER = {"GIT_COMMITTER_NAME": "mlx-local", "GIT_COMMITTER_EMAIL": "mlx-local@localhost"}
TRAILER_KEYS = ("Provides", "Applied-Upstream", "Forwarded")


# ---- series ----------------------------------------------------------------------------------


@dataclass
class SeriesEntry:
    """One patch line of patches/series: a file name and an optional version guard."""

    name: str
    guard: SpecifierSet | None = None

    def admits(self, version: Version) -> bool:
        """Whether this patch applies at a base of `version`."""
        return self.guard is None or self.guard.contains(version, prereleases=True)

    def line(self) -> str:
        return f"{self.name}  {self.guard}" if self.guard else self.name


@dataclass
class Series:
    """patches/series: patch entries in order, with comment lines kept where they were."""

    items: list[SeriesEntry | str] = field(default_factory=list)

    @classmethod
    def load(cls, path: Path) -> Series:
        """Parse a series file; unknown syntax is an error naming the line."""
        if not path.is_file():
            raise UserError(f"{path} is missing; restore it from git")
        items: list[SeriesEntry | str] = []
        for number, raw in enumerate(path.read_text().splitlines(), 1):
            text = raw.split("#", 1)[0].strip()
            if not text:
                items.append(raw)
                continue
            name, _, guard_text = text.partition(" ")
            guard = None
            if guard_text.strip():
                try:
                    guard = SpecifierSet(guard_text.strip().replace(" ", ""))
                except InvalidSpecifier:
                    raise UserError(
                        f"{path}:{number}: guard {guard_text.strip()!r} is not a version range "
                        "like <0.31.0 or >=0.30.7,<0.32.0"
                    ) from None
            items.append(SeriesEntry(name, guard))
        return cls(items)

    @property
    def entries(self) -> list[SeriesEntry]:
        return [item for item in self.items if isinstance(item, SeriesEntry)]

    def active(self, version: Version) -> list[SeriesEntry]:
        """The entries whose guard admits a base of `version`, in order."""
        return [entry for entry in self.entries if entry.admits(version)]

    def find(self, name: str) -> SeriesEntry | None:
        return next((entry for entry in self.entries if entry.name == name), None)

    def text(self) -> str:
        lines = [item.line() if isinstance(item, SeriesEntry) else item for item in self.items]
        return "".join(f"{line}\n" for line in lines)

    def save(self, path: Path) -> None:
        """Write the series atomically."""
        write_atomic(path, self.text())


# ---- patch files -----------------------------------------------------------------------------


@dataclass(frozen=True)
class PatchInfo:
    """What a patch file says about itself."""

    name: str
    subject: str
    author: str
    provides: tuple[str, ...]
    applied_upstream: str | None
    forwarded: str | None
    files: tuple[str, ...]


def read_patch(path: Path) -> PatchInfo:
    """Parse a `git format-patch` mail file."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UserError(
            f"patch {path.name} is listed in series but missing in {path.parent}"
        ) from None
    message = email.parser.Parser(policy=email.policy.compat32).parsestr(text)
    subject = re.sub(r"^\[PATCH[^\]]*\]\s*", "", " ".join(str(message["Subject"] or "").split()))
    body = message.get_payload()
    description = body.split("\n---\n", 1)[0] if isinstance(body, str) else ""
    trailers = parse_trailers(description)
    files = tuple(re.findall(r"(?m)^diff --git a/(\S+) b/", text))
    return PatchInfo(
        name=path.name,
        subject=subject,
        author=str(message["From"] or ""),
        provides=tuple(" ".join(trailers.get("Provides", [])).split()),
        applied_upstream=(trailers.get("Applied-Upstream") or [None])[-1],
        forwarded=(trailers.get("Forwarded") or [None])[-1],
        files=files,
    )


def parse_trailers(message: str) -> dict[str, list[str]]:
    """Trailers (`Key: value` lines) of the last paragraph of a commit message."""
    paragraphs = [p for p in message.strip().split("\n\n") if p.strip()]
    result: dict[str, list[str]] = {}
    if not paragraphs:
        return result
    for line in paragraphs[-1].splitlines():
        match = re.match(r"^([A-Za-z][A-Za-z0-9-]*):\s*(.*)$", line.strip())
        if match:
            result.setdefault(match.group(1), []).append(match.group(2).strip())
    return result


def format_commit(repo: Path, commit: str) -> str:
    """The stable `git format-patch` text of one commit."""
    return gitutil.git(repo, "format-patch", "-1", "--stdout", *FORMAT_PATCH_OPTIONS, commit).stdout


def reproduces(repo: Path, patch: Path, commit: str, commit_text: str) -> bool:
    """Whether the patch file `patch`, applied on the parent of `commit` as `git am -3` would,
    gives `commit` again: the same author, date and message as `commit_text` (the commit's
    own format-patch text) and the same tree."""
    stored = patch.read_text()
    if stored.partition("\n---\n")[0] != commit_text.partition("\n---\n")[0]:
        return False
    with tempfile.TemporaryDirectory(prefix="mlx-local-index-") as scratch:
        index = {"GIT_INDEX_FILE": str(Path(scratch) / "index")}
        gitutil.git(repo, "read-tree", f"{commit}^", env=index)
        applied = gitutil.git(repo, "apply", "--cached", "-3", str(patch), env=index, check=False)
        if applied.returncode != 0:
            return False
        tree = gitutil.out(repo, "write-tree", env=index)
    return tree == gitutil.out(repo, "rev-parse", f"{commit}^{{tree}}")


def patch_slug(subject: str) -> str:
    """A file-name part from a subject, as git format-patch makes it."""
    slug = re.sub(r"[^A-Za-z0-9._]+", "-", subject).strip("-.")
    return re.sub(r"-+", "-", slug)[:52].rstrip("-.") or "patch"


def next_number(names: list[str]) -> int:
    """The number after the highest `NNNN-` prefix among patch file names."""
    numbers = [int(m.group(1)) for n in names if (m := re.match(r"(\d{4})-", n))]
    return max(numbers, default=0) + 1


# ---- applying --------------------------------------------------------------------------------


@dataclass
class ApplyOutcome:
    """How one patch went onto a base."""

    name: str
    result: str  # "clean", "three-way", "empty", "conflict"
    files: list[str] = field(default_factory=list)
    detail: str = ""


def apply_patch(repo: Path, patch: Path, allow_empty_drop: bool = False) -> ApplyOutcome:
    """`git am -3` one patch onto HEAD of `repo`. On a conflict the am session stays open
    (the caller continues or aborts); an empty patch is dropped when `allow_empty_drop`."""
    before = gitutil.rev(repo, "HEAD")
    empty_mode = "drop" if allow_empty_drop else "stop"
    result = gitutil.git(
        repo,
        "am",
        "-3",
        "--committer-date-is-author-date",
        f"--empty={empty_mode}",
        str(patch),
        env=COMMITTER,
        check=False,
    )
    output = result.stdout + result.stderr
    if result.returncode == 0:
        if gitutil.rev(repo, "HEAD") == before:
            return ApplyOutcome(patch.name, "empty", detail=output)
        merged = "3-way merge" in output or "Falling back" in output
        return ApplyOutcome(patch.name, "three-way" if merged else "clean", detail=output)
    conflicted = gitutil.out(repo, "diff", "--name-only", "--diff-filter=U").splitlines()
    if not conflicted:
        conflicted = list(read_patch(patch).files)
    return ApplyOutcome(patch.name, "conflict", conflicted, output)


def am_in_progress(repo: Path) -> bool:
    """Whether a `git am` session is open in `repo`."""
    git_dir = Path(gitutil.out(repo, "rev-parse", "--absolute-git-dir"))
    return (git_dir / "rebase-apply").exists()


def conflict_hunks(repo: Path, limit: int = 60) -> str:
    """The conflicting hunks of an open am session, cut to `limit` lines."""
    lines = gitutil.git(repo, "diff", "--no-color", check=False).stdout.splitlines()
    if len(lines) > limit:
        lines = [*lines[:limit], f"... ({len(lines) - limit} more lines: `git diff` in {repo})"]
    return "\n".join(lines)


# ---- exporting -------------------------------------------------------------------------------


@dataclass
class ExportReport:
    """What an export wrote to patches/."""

    written: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)


def export_queue(
    repo: Path,
    base: str,
    head: str,
    patches_dir: Path,
    version: Version,
    *,
    at_pin: bool,
    absorbed: frozenset[str] = frozenset(),
    new_name: str | None = None,
) -> ExportReport:
    """Rewrite patches/ from the commits base..head: one file per commit, existing files keep
    their names (matched by subject), new commits get the next numbers (named after
    `new_name` when given), entries guarded out at `version` or `absorbed` by upstream there
    stay as they are. At the pin a file is rewritten when its text changed (patches/ is the
    pin's format-patch text, whose blob ids `git am -3` needs); at another base, where every
    text differs, only when the file no longer reproduces its commit. So a refresh with no
    real change is byte-identical at any base."""
    series_path = patches_dir / "series"
    series = Series.load(series_path)
    active = [e for e in series.active(version) if e.name not in absorbed]
    by_subject = {read_patch(patches_dir / e.name).subject: e for e in active}
    all_names = [e.name for e in series.entries]
    report = ExportReport()
    exported: list[SeriesEntry] = []
    number = next_number(all_names)
    new_count = 0
    for commit in gitutil.commits_between(repo, base, head):
        text = format_commit(repo, commit)
        subject = gitutil.out(repo, "log", "-1", "--format=%s", commit)
        entry = by_subject.pop(subject, None)
        if entry is None:
            new_count += 1
            label = subject
            if new_name:
                label = new_name if new_count == 1 else f"{new_name}-{new_count}"
            entry = SeriesEntry(f"{number:04d}-{patch_slug(label)}.patch")
            number += 1
        target = patches_dir / entry.name
        if target.is_file() and (
            target.read_text() == text or (not at_pin and reproduces(repo, target, commit, text))
        ):
            report.unchanged.append(entry.name)
        else:
            write_atomic(target, text)
            report.written.append(entry.name)
        exported.append(entry)
    for gone in by_subject.values():
        (patches_dir / gone.name).unlink(missing_ok=True)
        report.removed.append(gone.name)
    series.items = _merge_active(series.items, {e.name for e in active}, exported)
    if series.text() != series_path.read_text():
        series.save(series_path)
    return report


def _merge_active(
    items: list[SeriesEntry | str], active_names: set[str], exported: list[SeriesEntry]
) -> list[SeriesEntry | str]:
    """Put `exported` in the places of the active entries, in order, and any extra (new)
    entries after the last of them. Entries guarded out at this base and comments keep their
    places, so a patch that only older bases apply stays before the patches built on it."""
    merged: list[SeriesEntry | str] = []
    pending = list(exported)
    after_last_active: int | None = None
    for item in items:
        if isinstance(item, SeriesEntry) and item.name in active_names:
            if pending:
                merged.append(pending.pop(0))
            after_last_active = len(merged)
            continue
        merged.append(item)
    at = len(merged) if after_last_active is None else after_last_active
    merged[at:at] = pending
    return merged

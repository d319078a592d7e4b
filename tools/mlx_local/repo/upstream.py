"""Where upstream code comes from: the git URL, or a repository built from PyPI releases.

Either way the result is a git location (URL or local path) whose release tags `vX.Y.Z` the rest
of the code treats alike.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tarfile
import tempfile
import tomllib
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

from ..atomic import write_atomic
from ..errors import UserError
from . import gitutil

SOURCES = ("auto", "git", "pypi")
GIT_PROBE_TIMEOUT = 20.0
HTTP_TIMEOUT = 60.0
MIRROR_AUTHOR = ("mlx-lm PyPI releases", "pypi-mirror@mlx-local.invalid")
SDIST_ONLY = ("PKG-INFO", "setup.cfg")


@dataclass(frozen=True)
class UpstreamSettings:
    """The contents of patches/upstream.toml."""

    git_url: str
    pypi_name: str
    pypi_json_url: str
    pin: str
    supported: SpecifierSet

    @classmethod
    def load(cls, path: Path) -> UpstreamSettings:
        """Read and validate patches/upstream.toml."""
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise UserError(f"{path} is missing; restore it from git") from None
        except tomllib.TOMLDecodeError as error:
            raise UserError(f"{path} is not valid TOML: {error}") from None
        try:
            settings = cls(
                git_url=str(data["git_url"]),
                pypi_name=str(data["pypi_name"]),
                pypi_json_url=str(data.get("pypi_json_url", "https://pypi.org/pypi")),
                pin=str(data["pin"]),
                supported=SpecifierSet(str(data.get("supported", ""))),
            )
        except KeyError as error:
            raise UserError(f"{path} lacks the key {error.args[0]!r}") from None
        if tag_version(settings.pin) is None:
            raise UserError(f"{path}: pin {settings.pin!r} is not a release tag like v0.30.7")
        return settings


def write_pin(path: Path, tag: str) -> None:
    """Move `pin` in upstream.toml to `tag`, keeping every other line as it is."""
    text = path.read_text()
    new_text, count = re.subn(r'(?m)^pin\s*=\s*"[^"]*"', f'pin = "{tag}"', text)
    if count != 1:
        raise UserError(f'{path} has no single `pin = "..."` line to update')
    write_atomic(path, new_text)


def tag_version(tag: str) -> Version | None:
    """The version a release tag names (`v0.31.3` -> 0.31.3), or None for other tags."""
    if not re.fullmatch(r"v\d+(\.\d+)*\S*", tag):
        return None
    try:
        return Version(tag[1:])
    except InvalidVersion:
        return None


def release_tags(tags: list[str], include_pre: bool = False) -> list[str]:
    """Release tags sorted by version, oldest first."""
    versioned = [(v, t) for t in tags if (v := tag_version(t)) is not None]
    return [t for v, t in sorted(versioned) if include_pre or not v.is_prerelease]


@dataclass
class Remote:
    """A git location to fetch release tags from, and how it was found."""

    location: str
    source: str
    notes: list[str] = field(default_factory=list)


def resolve_remote(
    settings: UpstreamSettings,
    cache_dir: Path,
    source: str = "auto",
    upstream: str | None = None,
    wanted: list[str] | None = None,
    refresh: bool = False,
) -> Remote:
    """Find where to fetch upstream from. `upstream` overrides the git URL; `wanted` names tags
    the PyPI mirror must contain (beyond the supported range); `refresh` asks PyPI for new
    releases even when the cached mirror already has every wanted tag."""
    if source not in SOURCES:
        raise UserError(f"unknown source {source!r}; use one of {', '.join(SOURCES)}")
    url = upstream or settings.git_url
    if Path(url).exists():  # a local clone: git runs elsewhere, so make the path absolute
        url = str(Path(url).resolve())
    notes: list[str] = []
    if source in ("auto", "git"):
        problem = probe_git(url)
        if problem is None:
            return Remote(url, "git")
        if source == "git":
            raise UserError(f"upstream {url} cannot be reached ({problem}); try --source pypi")
        notes.append(f"git upstream {url} unreachable ({problem}); using PyPI releases")
    mirror = cache_dir / "upstream" / "pypi-mirror"
    try:
        build_pypi_mirror(
            mirror, settings, cache_dir / "upstream" / "sdists", wanted or [], refresh
        )
    except UserError as error:
        tried = f"git {url} and " if source == "auto" else ""
        raise UserError(f"no upstream reachable: tried {tried}PyPI ({error})") from None
    return Remote(str(mirror), "pypi", notes)


def probe_git(url: str) -> str | None:
    """None when `git ls-remote` reaches `url`, else the reason it did not."""
    try:
        gitutil.git(Path.cwd(), "ls-remote", "--tags", url, timeout=GIT_PROBE_TIMEOUT)
    except gitutil.GitError as error:
        return str(error)
    return None


# ---- the PyPI mirror -------------------------------------------------------------------------


@dataclass(frozen=True)
class Release:
    """One sdist on PyPI."""

    version: str
    filename: str
    url: str
    sha256: str
    upload_time: str
    yanked: bool


def fetch_release_index(settings: UpstreamSettings) -> list[Release]:
    """Every sdist release of the project, from PyPI's JSON API."""
    url = f"{settings.pypi_json_url.rstrip('/')}/{settings.pypi_name}/json"
    try:
        with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT) as response:
            data = json.load(response)
    except (urllib.error.URLError, TimeoutError, OSError, ValueError) as error:
        raise UserError(f"cannot read {url}: {error}") from None
    releases = []
    for version, files in data.get("releases", {}).items():
        for item in files:
            if item.get("packagetype") == "sdist":
                releases.append(
                    Release(
                        version=version,
                        filename=item["filename"],
                        url=urllib.parse.urljoin(url, item["url"]),
                        sha256=item["digests"]["sha256"],
                        upload_time=item["upload_time_iso_8601"],
                        yanked=bool(item.get("yanked")),
                    )
                )
    return releases


def select_releases(
    releases: list[Release], supported: SpecifierSet, wanted: list[str]
) -> list[Release]:
    """Releases the mirror holds: non-yanked final releases in the supported range, plus every
    release named in `wanted` (tags or versions), sorted by version."""
    wanted_versions = {str(tag_version(w) or Version(w)) for w in wanted}
    chosen = {}
    for release in releases:
        version = Version(release.version)
        normal = not release.yanked and not version.is_prerelease and version in supported
        if normal or str(version) in wanted_versions:
            chosen[version] = release
    missing = wanted_versions - {str(v) for v in chosen}
    if missing:
        raise UserError(f"PyPI has no sdist for release {', '.join(sorted(missing))}")
    return [chosen[v] for v in sorted(chosen)]


def build_pypi_mirror(
    dest: Path,
    settings: UpstreamSettings,
    sdist_cache: Path,
    wanted: list[str],
    refresh: bool = False,
) -> Path:
    """Make `dest` a git repository with one commit per release on `main` and a tag `vX.Y.Z`
    each. Fixed author and dates make it reproducible; cached sdists make reruns offline."""
    index_file = sdist_cache / "index.json"
    have = cached_index(index_file)
    needed_tags = {f"v{tag_version(w) or Version(w)}" for w in wanted}
    if not refresh and have and gitutil.is_repo(dest) and needed_tags <= set(gitutil.tags(dest)):
        return dest
    try:
        releases = fetch_release_index(settings)
        save_index(index_file, releases)
    except UserError:
        if not have:
            raise
        releases = have
    selected = select_releases(releases, settings.supported, wanted)
    existing = gitutil.tags(dest) if gitutil.is_repo(dest) else []
    if [f"v{r.version}" for r in selected] == release_tags(existing):
        return dest
    sdists = [download_sdist(release, sdist_cache) for release in selected]
    build_repository(dest, selected, sdists, settings.pypi_name)
    return dest


def cached_index(path: Path) -> list[Release]:
    """The release index saved by the last successful fetch, or []."""
    try:
        return [Release(**item) for item in json.loads(path.read_text())]
    except (FileNotFoundError, ValueError, TypeError):
        return []


def save_index(path: Path, releases: list[Release]) -> None:
    """Save the release index atomically."""
    write_atomic(path, json.dumps([r.__dict__ for r in releases], indent=1))


def download_sdist(release: Release, cache: Path) -> Path:
    """The sdist file of `release`, downloaded once and checked against PyPI's sha256."""
    target = cache / release.filename
    if target.is_file() and _sha256(target) == release.sha256:
        return target
    cache.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".part")
    try:
        with (
            urllib.request.urlopen(release.url, timeout=HTTP_TIMEOUT) as response,
            partial.open("wb") as handle,
        ):
            shutil.copyfileobj(response, handle)
    except (urllib.error.URLError, TimeoutError, OSError) as error:
        partial.unlink(missing_ok=True)
        raise UserError(f"cannot download {release.url}: {error}") from None
    if _sha256(partial) != release.sha256:
        partial.unlink()
        raise UserError(f"{release.filename} does not match PyPI's sha256; try again")
    partial.replace(target)
    return target


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def build_repository(dest: Path, releases: list[Release], sdists: list[Path], name: str) -> None:
    """Write the mirror repository into a new folder and swap it in place of `dest`."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".mirror-", dir=dest.parent))
    try:
        gitutil.git(work, "init", "--quiet", "--initial-branch=main")
        parent: str | None = None
        for release, sdist in zip(releases, sdists, strict=True):
            parent = commit_release(work, release, sdist, parent, name)
        old = dest.with_name(dest.name + ".old")
        if dest.exists():
            dest.rename(old)
        work.rename(dest)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def commit_release(repo: Path, release: Release, sdist: Path, parent: str | None, name: str) -> str:
    """Commit the files of one sdist (less what only sdists carry) and tag it."""
    tree_dir = repo.parent / f".sdist-{release.version}"
    shutil.rmtree(tree_dir, ignore_errors=True)
    try:
        extract_sdist(sdist, tree_dir)
        env = {"GIT_INDEX_FILE": str(repo / ".git" / "mirror-index")}
        (repo / ".git" / "mirror-index").unlink(missing_ok=True)
        gitutil.git(repo, f"--work-tree={tree_dir}", "add", "--all", "--force", ".", env=env)
        tree = gitutil.out(repo, "write-tree", env=env)
    finally:
        shutil.rmtree(tree_dir, ignore_errors=True)
    identity = gitutil.fixed_identity(*MIRROR_AUTHOR, release.upload_time)
    message = f"{name} {release.version}\n\nFiles of the PyPI sdist {release.filename}.\n"
    parents = ["-p", parent] if parent else []
    commit = gitutil.out(repo, "commit-tree", tree, *parents, "-m", message, env=identity)
    gitutil.git(repo, "update-ref", "refs/heads/main", commit)
    gitutil.git(
        repo,
        "tag",
        "-a",
        f"v{release.version}",
        "-m",
        f"{name} {release.version}",
        commit,
        env=identity,
    )
    return commit


def extract_sdist(sdist: Path, dest: Path) -> None:
    """Unpack an sdist's files into `dest`, without its top folder and sdist-only metadata."""
    dest.mkdir(parents=True)
    with tarfile.open(sdist) as archive:
        for member in archive.getmembers():
            parts = Path(member.name).parts[1:]
            if not parts or parts[0] in SDIST_ONLY or parts[0].endswith(".egg-info"):
                continue
            if not (member.isfile() or member.isdir()):
                continue
            member.name = str(Path(*parts))
            archive.extract(member, dest, filter="data")

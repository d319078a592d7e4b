"""Where a model's weights come from: a Hugging Face hub id (downloaded into the hub's own
cache) or a local folder. Sizes are known before anything is downloaded."""

from __future__ import annotations

import fnmatch
import hashlib
import json
import math
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError

# The files mlx_lm reads from a Hugging Face repository (mlx_lm.utils._download).
ALLOW_PATTERNS = [
    "*.json",
    "model*.safetensors",
    "*.py",
    "tokenizer.model",
    "*.tiktoken",
    "tiktoken.model",
    "*.txt",
    "*.jsonl",
    "*.jinja",
]
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
BYTES_PER_PARAM = {"float32": 4, "float16": 2, "bfloat16": 2}
SAFETENSORS_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2}


@dataclass
class Source:
    """A model to convert, inspected but not yet downloaded."""

    kind: str  # "hub" or "local"
    spec: str  # as the user wrote it
    repo_id: str | None = None
    requested_revision: str | None = None
    revision: str | None = None  # exact commit sha for hub sources
    path: Path | None = None  # local folder; for hub sources the snapshot once downloaded
    files: dict[str, int] = field(default_factory=dict)  # file -> bytes, files mlx_lm reads
    download_bytes: int = 0  # bytes not yet in the hub cache
    parameters: int | None = None  # from safetensors headers or hub metadata, if known
    model_type: str | None = None
    config: dict = field(default_factory=dict)
    offline: bool = False  # hub unreachable: working from the local cache only

    @property
    def display_name(self) -> str:
        """The model's own name: the repository or folder name."""
        return (self.repo_id or str(self.path)).rstrip("/").split("/")[-1]

    @property
    def weight_bytes(self) -> int:
        return sum(size for name, size in self.files.items() if name.endswith(".safetensors"))


def wanted(filename: str) -> bool:
    """Whether mlx_lm needs this repository file."""
    return any(fnmatch.fnmatch(filename, pattern) for pattern in ALLOW_PATTERNS)


def inspect(spec: str, revision: str | None = None) -> Source:
    """Resolve `spec` (local folder or hub id) into a Source, without downloading weights."""
    path = Path(spec).expanduser()
    if path.exists():
        if revision:
            raise UserError(f"--revision applies to hub ids; {spec} is a local folder")
        return _inspect_local(spec, path)
    if not HUB_ID.match(spec):
        raise UserError(f"{spec} is neither a local folder nor a hub id like Qwen/Qwen3-0.6B")
    return _inspect_hub(spec, revision)


def _inspect_local(spec: str, path: Path) -> Source:
    if not path.is_dir() or not (path / "config.json").is_file():
        raise UserError(f"{spec} is not a Hugging Face model folder (no config.json in it)")
    files = {
        p.relative_to(path).as_posix(): p.stat().st_size
        for p in sorted(path.rglob("*"))
        if p.is_file() and wanted(p.relative_to(path).as_posix())
    }
    if not any(name.endswith(".safetensors") for name in files):
        raise UserError(f"{spec} has no model*.safetensors weights; mlx_lm needs safetensors")
    config = _read_config(path / "config.json", spec)
    source = Source(kind="local", spec=spec, path=path.resolve(), files=files, config=config)
    source.model_type = config.get("model_type")
    try:
        source.parameters = check_weights(path, files)
    except DamagedWeights as error:
        raise UserError(
            f"{spec}: {error}; the download is incomplete or the file is damaged "
            "(nothing was written to local-models/)"
        ) from None
    return source


def _read_config(file: Path, spec: str) -> dict:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise UserError(f"{spec}: config.json is unreadable ({error})") from None


class DamagedWeights(Exception):
    """A safetensors file whose header is unreadable or promises more bytes than it holds."""


def read_header(file: Path) -> dict:
    """The JSON header of a safetensors file, checked against the file's size."""
    size = file.stat().st_size
    with open(file, "rb") as handle:
        raw = handle.read(8)
        if len(raw) < 8:
            raise DamagedWeights(f"{file.name} is empty or truncated ({size} bytes)")
        (length,) = struct.unpack("<Q", raw)
        if length > min(size - 8, 100_000_000):
            raise DamagedWeights(f"{file.name} has no valid safetensors header")
        try:
            header = json.loads(handle.read(length))
        except ValueError:
            raise DamagedWeights(f"{file.name} has a corrupt safetensors header") from None
    tensors = [t for key, t in header.items() if key != "__metadata__"]
    end = 8 + length + max((t["data_offsets"][1] for t in tensors), default=0)
    if end > size:
        raise DamagedWeights(
            f"{file.name} is truncated: {size} bytes where its header promises {end}"
        )
    return header


def check_weights(folder: Path, files: dict[str, int]) -> int:
    """Check every safetensors header of a model folder; return the parameter count."""
    total = 0
    for name in files:
        if name.endswith(".safetensors"):
            for key, tensor in read_header(folder / name).items():
                if key != "__metadata__":
                    total += math.prod(tensor["shape"])
    return total


def _is_network_error(error: BaseException) -> bool:
    names = {cls.__name__ for cls in type(error).__mro__}
    return isinstance(error, (ConnectionError, TimeoutError)) or bool(
        names & {"TransportError", "RequestError", "ConnectionError", "Timeout", "ConnectError"}
    )


def _inspect_hub(repo_id: str, revision: str | None) -> Source:
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    source = Source(kind="hub", spec=repo_id, repo_id=repo_id, requested_revision=revision)
    try:
        info = HfApi().model_info(repo_id, revision=revision, files_metadata=True)
    except GatedRepoError:
        raise UserError(_gated_message(repo_id)) from None
    except RepositoryNotFoundError:
        raise UserError(
            f"unknown hub id {repo_id}: no such model on the Hugging Face hub "
            "(if it is private, log in with `hf auth login` or set HF_TOKEN)"
        ) from None
    except RevisionNotFoundError:
        raise UserError(f"{repo_id} has no revision {revision!r}") from None
    except OfflineModeIsEnabled:
        return _inspect_cached(source, "HF_HUB_OFFLINE is set")
    except HfHubHTTPError as error:
        raise UserError(
            f"the Hugging Face hub refused {repo_id}: {error}".splitlines()[0]
        ) from None
    except Exception as error:
        if not _is_network_error(error):
            raise
        return _inspect_cached(source, f"the hub is unreachable ({error})")

    if info.gated and not get_token():
        raise UserError(_gated_message(repo_id))
    source.revision = info.sha
    source.files = {
        s.rfilename: int(s.size or 0) for s in info.siblings or [] if wanted(s.rfilename)
    }
    source.config = dict(info.config or {})
    source.model_type = source.config.get("model_type")
    if info.safetensors is not None:
        source.parameters = int(info.safetensors.total)
    source.download_bytes = sum(
        size for name, size in source.files.items() if not _cached(repo_id, name, info.sha)
    )
    if not any(name.endswith(".safetensors") for name in source.files):
        raise UserError(f"{repo_id} has no model*.safetensors weights; mlx_lm needs safetensors")
    return source


def _gated_message(repo_id: str) -> str:
    return (
        f"{repo_id} is a gated model: accept its terms on https://huggingface.co/{repo_id} "
        "and log in with `hf auth login` (or set HF_TOKEN)"
    )


def _cached(repo_id: str, filename: str, sha: str | None) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, filename, revision=sha), str)


def _inspect_cached(source: Source, why: str) -> Source:
    """A hub source resolved from the local hub cache only (offline)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        snapshot = Path(
            snapshot_download(
                source.repo_id,
                revision=source.requested_revision,
                allow_patterns=ALLOW_PATTERNS,
                local_files_only=True,
            )
        )
    except LocalEntryNotFoundError:
        revision = f" at {source.requested_revision}" if source.requested_revision else ""
        raise UserError(
            f"{source.repo_id}{revision} is neither a local folder nor in the local "
            f"Hugging Face cache, and {why}"
        ) from None
    local = _inspect_local(source.spec, snapshot)
    source.offline = True
    source.path = snapshot
    source.revision = snapshot.name
    source.files = local.files
    source.config = local.config
    source.model_type = local.model_type
    source.parameters = local.parameters
    return source


def download(source: Source) -> Path:
    """Download a hub source into the hub cache (progress bar, resumable); return the snapshot."""
    if source.kind == "local" or source.path is not None:
        assert source.path is not None
        return source.path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError

    try:
        path = snapshot_download(
            source.repo_id, revision=source.revision, allow_patterns=ALLOW_PATTERNS
        )
    except GatedRepoError:
        raise UserError(_gated_message(source.repo_id or "")) from None
    except Exception as error:
        if not _is_network_error(error):
            raise
        raise UserError(
            f"download of {source.repo_id} interrupted ({error}); rerun to resume it"
        ) from None
    source.path = Path(path)
    source.files = {
        name: (source.path / name).stat().st_size
        for name in source.files
        if (source.path / name).is_file()
    }
    try:
        source.parameters = check_weights(source.path, source.files)
    except DamagedWeights as error:
        raise UserError(
            f"{source.repo_id}: {error} in the hub cache; remove it with `hf cache delete` "
            "and run again"
        ) from None
    return source.path


def content_hash(folder: Path, files: list[str]) -> str:
    """sha256 over the names and contents of `files` in `folder`, in sorted order."""
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(name.encode() + b"\0")
        with open(folder / name, "rb") as handle:
            digest.update(hashlib.file_digest(handle, "sha256").digest())
    return digest.hexdigest()


def predicted_parameters(source: Source) -> int:
    """Parameters of the source: declared ones, else estimated from the weight bytes."""
    if source.parameters:
        return source.parameters
    per_param = BYTES_PER_PARAM.get(str(source.config.get("torch_dtype")), 2)
    return source.weight_bytes // per_param

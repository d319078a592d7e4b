"""convert-model, model manifests, listing: what lives in local-models/.

Conversion runs mlx_lm (the patched checkout) in a subprocess of `project.runtime_python()`,
into a temporary folder inside local-models/ that is renamed into place only once the result
loads and generates. A failure or an interruption leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from . import model_source, project
from .errors import UserError
from .locking import project_lock
from .model_source import Source

MANIFEST_FILE = "mlx-local-manifest.json"
RUNNER = Path(__file__).with_name("convert_runner.py")
# What mlx_lm 0.30.7 offers (mlx_lm.convert.QUANT_RECIPES); the runner re-checks at run time.
RECIPES = ("mixed_2_6", "mixed_3_4", "mixed_3_6", "mixed_4_6")
BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)
DTYPES = ("float16", "bfloat16", "float32")
DTYPE_SHORT = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}
NAME = re.compile(r"^[A-Za-z0-9][\w.+-]*$")
DEFAULT_BITS = 4
VERIFY_TOKENS = 4
DISK_MARGIN = 1.05

FreeSpace = Callable[[Path], int]


@dataclass
class ConvertOptions:
    """What the user asked for (the convert-model flags)."""

    revision: str | None = None
    bits: int | None = None
    group_size: int = 64
    recipe: str | None = None
    dtype: str | None = None
    quantize: bool = True
    name: str | None = None
    force: bool = False

    def quantization(self) -> dict | None:
        if not self.quantize:
            return None
        bits = self.bits or DEFAULT_BITS
        return {
            "bits": bits,
            "group_size": self.group_size,
            "mode": "affine",
            "recipe": self.recipe,
        }


@dataclass
class Plan:
    """Everything convert-model decided before doing anything."""

    source: Source
    name: str
    output: Path
    quantization: dict | None
    dtype: str | None
    parameters: int
    predicted_bytes: int
    replaces: bool
    runtime: dict = field(default_factory=dict)  # mlx/mlx_lm versions from the runtime python
    disk: list[dict] = field(default_factory=list)  # per filesystem: where, need, free


# ---------------------------------------------------------------- names and lookup


def default_name(source: Source, options: ConvertOptions) -> str:
    """`<Model>-MLX-<bits>bit`, `<Model>-MLX-<recipe>`, or `<Model>-MLX-<dtype>`."""
    base = source.display_name
    if not options.quantize:
        dtype = options.dtype or source.config.get("torch_dtype") or "float16"
        return f"{base}-MLX-{DTYPE_SHORT.get(dtype, dtype)}"
    if options.recipe:
        return f"{base}-MLX-{options.recipe}"
    return f"{base}-MLX-{options.bits or DEFAULT_BITS}bit"


def check_name(name: str) -> str:
    if not NAME.match(name):
        raise UserError(
            f"bad model name {name!r}: use letters, digits, '.', '_', '+' and '-' (no '/')"
        )
    return name


def model_folders(models_dir: Path) -> list[Path]:
    """Model folders in local-models/ (hidden temporary folders excluded)."""
    if not models_dir.is_dir():
        return []
    return sorted(
        p
        for p in models_dir.iterdir()
        if p.is_dir() and not p.name.startswith(".") and (p / "config.json").is_file()
    )


# ---------------------------------------------------------------- manifests and listing


def folder_files(folder: Path) -> dict[str, int]:
    """Every file below `folder` with its size, the manifest excluded."""
    return {
        p.relative_to(folder).as_posix(): p.stat().st_size
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST_FILE
    }


def read_manifest(folder: Path) -> dict | None:
    file = folder / MANIFEST_FILE
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except ValueError:
        return None


def context_length(config: dict) -> int | None:
    """The longest context the model was trained for, as its config names it."""
    for scope in (config, config.get("text_config") or {}):
        for key in ("max_position_embeddings", "max_sequence_length", "seq_length", "n_ctx"):
            if isinstance(scope.get(key), int):
                return scope[key]
    return None


def describe(folder: Path) -> dict:
    """One row of `mlx-local models`: from the manifest, else from config.json."""
    files = folder_files(folder)
    manifest = read_manifest(folder)
    row = {"name": folder.name, "path": str(folder), "size_bytes": sum(files.values())}
    if manifest is not None:
        verification = manifest.get("verification") or {}
        return row | {
            "source": manifest.get("source"),
            "quantization": manifest.get("quantization"),
            "dtype": manifest.get("dtype"),
            "parameters": manifest.get("parameters"),
            "context_length": manifest.get("context_length"),
            "created": manifest.get("created"),
            "verified": verification.get("ok"),
            "manifest": True,
        }
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except ValueError:
        config = {}
    quant = config.get("quantization")
    return row | {
        "source": None,
        "quantization": (
            {"bits": quant.get("bits"), "group_size": quant.get("group_size")} if quant else None
        ),
        "dtype": config.get("torch_dtype"),
        "parameters": None,
        "context_length": context_length(config),
        "created": None,
        "verified": None,
        "manifest": False,
    }


def list_models(proj: project.Project | None = None) -> list[dict]:
    """Every model in local-models/, described."""
    proj = proj or project.current()
    return [describe(folder) for folder in model_folders(proj.models_dir)]


def remove_model(name: str, proj: project.Project | None = None) -> Path:
    """Delete local-models/NAME (first renamed aside, so it vanishes at once)."""
    proj = proj or project.current()
    folder = proj.models_dir / check_name(name)
    with project_lock(proj.state_dir, f"models rm {name}"):
        if not folder.is_dir():
            known = ", ".join(p.name for p in model_folders(proj.models_dir)) or "none"
            raise UserError(f"no model {name!r} in local-models/ (there: {known})")
        doomed = proj.models_dir / f".rm-{name}-{os.getpid()}"
        folder.rename(doomed)
        shutil.rmtree(doomed)
    return folder


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale(models_dir: Path) -> list[str]:
    """Remove what killed conversions left behind; put back a model a killed --force moved."""
    swept = []
    if not models_dir.is_dir():
        return swept
    for path in sorted(models_dir.iterdir()):
        match = re.match(r"^\.(tmp|old|rm)-(.+)-(\d+)$", path.name)
        if not match or _pid_alive(int(match[3])):
            continue
        kind, name = match[1], match[2]
        if kind == "old" and not (models_dir / name).exists():
            path.rename(models_dir / name)
        else:
            shutil.rmtree(path, ignore_errors=True)
        swept.append(path.name)
    return swept


# ---------------------------------------------------------------- planning


def _runner(
    command: str, argument: str | dict, log: Path | None = None, quiet: bool = False
) -> dict:
    """Run convert_runner.py in the runtime python; its JSON answer."""
    python = project.runtime_python()
    env = os.environ | {"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    with tempfile.TemporaryDirectory(prefix="mlx-local-runner-") as scratch, ExitStack() as stack:
        result_file = Path(scratch) / "result.json"
        if isinstance(argument, dict):
            (Path(scratch) / "spec.json").write_text(json.dumps(argument))
            argument = str(Path(scratch) / "spec.json")
        output = subprocess.DEVNULL
        if log:
            output = stack.enter_context(open(log, "a", encoding="utf-8"))
        try:
            done = subprocess.run(
                [str(python), str(RUNNER), command, argument, str(result_file)],
                stdout=output if quiet else None,
                stderr=output,
                env=env,
            )
        except FileNotFoundError:
            raise UserError(f"runtime python {python} not found; run setup-repo first") from None
        if result_file.is_file():
            return json.loads(result_file.read_text())
    where = f"; see {log}" if log else ""
    return {"ok": False, "kind": "crashed", "message": f"exit code {done.returncode}{where}"}


def probe_runtime(model_type: str) -> dict:
    """Ask the runtime python's mlx_lm whether it supports `model_type` (and its versions)."""
    result = _runner("probe", model_type)
    if not result["ok"]:
        if result["kind"] == "no_mlx_lm":
            raise UserError(f"mlx_lm is not installed ({result['message']}); run setup-repo first")
        raise UserError(f"could not ask mlx_lm about {model_type}: {result['message']}")
    return result


def predict_bytes(source: Source, quantization: dict | None, dtype: str | None) -> int:
    """About how big the converted model will be."""
    params = model_source.predicted_parameters(source)
    if quantization is None:
        dtype = dtype or source.config.get("torch_dtype") or "float16"
        bits_per_weight = 8.0 * model_source.BYTES_PER_PARAM.get(dtype, 2)
    else:
        bits_per_weight = quantization["bits"] + 32 / quantization["group_size"]
        if recipe := quantization.get("recipe"):
            low, high = (int(b) for b in recipe.split("_")[1:])
            bits_per_weight = low + 0.15 * (high - low) + 32 / quantization["group_size"]
    others = sum(size for name, size in source.files.items() if not name.endswith(".safetensors"))
    return int(params * bits_per_weight / 8) + others


def _existing_parent(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path


def hub_cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def disk_needs(plan: Plan, free_space: FreeSpace) -> list[dict]:
    """Bytes needed and free on each filesystem involved (download cache, local-models/)."""
    needs: dict[int, dict] = {}
    wants = [(plan.output.parent, plan.predicted_bytes, "output")]
    if plan.source.download_bytes:
        wants.append((hub_cache_dir(), plan.source.download_bytes, "download"))
    for where, amount, what in wants:
        existing = _existing_parent(where)
        entry = needs.setdefault(
            existing.stat().st_dev,
            {"where": str(where), "free": free_space(existing), "need": 0, "parts": {}},
        )
        entry["need"] += int(amount * DISK_MARGIN)
        entry["parts"][what] = amount
    return list(needs.values())


def _free(path: Path) -> int:
    return shutil.disk_usage(path).free


def plan_conversion(
    spec: str,
    options: ConvertOptions,
    proj: project.Project | None = None,
    free_space: FreeSpace = _free,
) -> Plan:
    """Inspect the source and check everything that can be checked before any work."""
    proj = proj or project.current()
    if options.recipe and options.bits:
        raise UserError("--bits and --recipe exclude each other: a recipe sets the bits per layer")
    if not options.quantize and (options.bits or options.recipe):
        raise UserError("--no-quantize excludes --bits and --recipe")
    source = model_source.inspect(spec, options.revision)
    name = check_name(options.name or default_name(source, options))
    output = proj.models_dir / name
    if output.exists() and not options.force:
        raise UserError(
            f"local-models/{name} already exists; use --force to replace it or --name to pick "
            "another name"
        )
    if options.quantize and "quantization" in source.config:
        raise UserError(
            f"{spec} is already quantized by mlx; use it as it is or convert with --no-quantize"
        )
    if not source.model_type:
        source.model_type = _fetch_model_type(source)
    runtime = probe_runtime(source.model_type)
    if not runtime["supported"]:
        raise UserError(
            f"unsupported architecture {source.model_type!r}: mlx_lm {runtime['mlx_lm']} "
            f"has no implementation of it"
        )
    if options.recipe and options.recipe not in runtime["recipes"]:
        raise UserError(
            f"mlx_lm {runtime['mlx_lm']} has no recipe {options.recipe}; it offers "
            + ", ".join(runtime["recipes"])
        )
    quantization = options.quantization()
    plan = Plan(
        source=source,
        name=name,
        output=output,
        quantization=quantization,
        dtype=options.dtype,
        parameters=model_source.predicted_parameters(source),
        predicted_bytes=predict_bytes(source, quantization, options.dtype),
        replaces=output.exists(),
        runtime={k: runtime[k] for k in ("mlx", "mlx_lm", "mlx_lm_path")},
    )
    plan.disk = disk_needs(plan, free_space)
    for entry in plan.disk:
        if entry["need"] > entry["free"]:
            parts = " + ".join(f"{what} {gb(size)}" for what, size in entry["parts"].items())
            raise UserError(
                f"not enough disk space on {entry['where']}: need {gb(entry['need'])} ({parts}, "
                f"5% margin), {gb(entry['free'])} free; free some space or choose fewer --bits"
            )
    return plan


def _fetch_model_type(source: Source) -> str:
    """model_type from config.json, downloading just that file for a hub source."""
    if source.kind == "hub" and source.path is None:
        from huggingface_hub import hf_hub_download

        config_file = Path(hf_hub_download(source.repo_id, "config.json", revision=source.revision))
        source.config = json.loads(config_file.read_text(encoding="utf-8"))
    model_type = source.config.get("model_type")
    if not model_type:
        raise UserError(f"{source.spec}: config.json names no model_type; mlx_lm cannot load it")
    return model_type


def gb(size: int | float) -> str:
    """Human size: 1.23 GB, 456.7 MB, 12.0 kB (decimal units, as disks are sold)."""
    for unit, factor in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= factor:
            return f"{size / factor:.{2 if unit == 'GB' else 1}f} {unit}"
    return f"{int(size)} B"


# ---------------------------------------------------------------- converting


@contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """Let SIGTERM unwind like Ctrl-C, so `finally` blocks clean up."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def convert_model(
    plan: Plan,
    proj: project.Project | None = None,
    quiet: bool = False,
) -> dict:
    """Download (if needed), convert, verify and install the model of `plan`; its manifest."""
    proj = proj or project.current()
    proj.logs_dir.mkdir(parents=True, exist_ok=True)
    log = proj.logs_dir / f"convert-{plan.name}.log"
    log.write_text(f"convert-model {plan.source.spec} -> {plan.name}\n", encoding="utf-8")
    with _sigterm_interrupts():
        source_dir = model_source.download(plan.source)
        with project_lock(proj.state_dir, f"convert-model {plan.name}"):
            proj.models_dir.mkdir(parents=True, exist_ok=True)
            sweep_stale(proj.models_dir)
            if plan.output.exists() and not plan.replaces:
                raise UserError(f"local-models/{plan.name} appeared meanwhile; use --force")
            tmp = proj.models_dir / f".tmp-{plan.name}-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                result = _convert_into(plan, source_dir, tmp, log, quiet)
                manifest = _manifest(plan, source_dir, tmp, result)
                (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
                _install(tmp, plan.output)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def _convert_into(plan: Plan, source_dir: Path, tmp: Path, log: Path, quiet: bool) -> dict:
    quant = plan.quantization or {}
    spec = {
        "source": str(source_dir),
        "output": str(tmp),
        "quantize": plan.quantization is not None,
        "bits": quant.get("bits", DEFAULT_BITS),
        "group_size": quant.get("group_size", 64),
        "recipe": quant.get("recipe"),
        "dtype": plan.dtype,
        "verify_tokens": VERIFY_TOKENS,
    }
    result = _runner("convert", spec, log=log, quiet=quiet)
    if result["ok"] and not result["verification"]["ok"]:
        result = {"ok": False, "kind": "verify", "message": "it generated no tokens"}
    if not result["ok"]:
        raise UserError(_failure_message(plan, result, log))
    return result


def _failure_message(plan: Plan, result: dict, log: Path) -> str:
    what = {
        "unsupported_architecture": "unsupported architecture",
        "corrupt_weights": "the weights are damaged or incomplete",
        "verify": "the converted model does not work",
        "out_of_memory": "out of memory",
    }.get(result["kind"], "conversion failed")
    message = result["message"].replace("\n", " ")
    if len(message) > 300:
        message = message[:297] + "..."
    return (
        f"converting {plan.source.spec} failed, {what}: {message} "
        f"(nothing was written to local-models/; log: {log})"
    )


def _manifest(plan: Plan, source_dir: Path, folder: Path, result: dict) -> dict:
    source = plan.source
    if source.kind == "hub":
        origin = {
            "kind": "hub",
            "repo_id": source.repo_id,
            "revision": source.revision,
            "requested_revision": source.requested_revision,
        }
    else:
        origin = {
            "kind": "local",
            "path": str(source_dir),
            "content_sha256": model_source.content_hash(source_dir, list(source.files)),
        }
    files = folder_files(folder)
    config = result["config"]
    return {
        "format": 1,
        "name": plan.name,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "source": origin,
        "model_type": config.get("model_type"),
        "quantization": plan.quantization,
        "dtype": plan.dtype or config.get("torch_dtype"),
        "mlx": result["mlx"],
        "mlx_lm": result["mlx_lm"],
        "parameters": result["parameters"],
        "context_length": context_length(config),
        "size_bytes": sum(files.values()),
        "files": files,
        "convert_seconds": result["convert_seconds"],
        "verification": result["verification"],
    }


def _install(tmp: Path, output: Path) -> None:
    """Rename the verified folder into place; an old model is moved aside, then deleted."""
    old = output.with_name(f".old-{output.name}-{os.getpid()}")
    if output.exists():
        output.rename(old)
    tmp.rename(output)
    shutil.rmtree(old, ignore_errors=True)

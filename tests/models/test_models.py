"""convert-model on the demo model (offline): 4 bits, 8 bits, a mixed recipe; manifests checked
against the real files; the results load and generate with the patched mlx_lm; models list/rm."""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import textwrap
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from safetensors import safe_open

from mlx_local.models import demo_model as demo_model_files
from mlx_local.models.convert import VERIFY_TOKENS
from mlx_local.models.manifest import MANIFEST_FILE
from tests.conftest import PatchedRuntime, make_project
from tests.helpers import run_cli

# name -> (flags, {weight: (bits, group size)} spot checks)
CONVERSIONS = {
    "demo-4bit": (
        ["--bits", "4"],
        {"model.layers.0.self_attn.q_proj": (4, 64), "model.layers.1.mlp.down_proj": (4, 64)},
    ),
    "demo-8bit-g32": (
        ["--bits", "8", "--group-size", "32"],
        {"model.layers.0.self_attn.q_proj": (8, 32), "model.embed_tokens": (8, 32)},
    ),
    "demo-mixed": (
        ["--recipe", "mixed_3_6"],
        {
            "model.layers.0.self_attn.q_proj": (3, 64),
            "model.layers.0.self_attn.v_proj": (3, 64),
            "model.layers.1.self_attn.v_proj": (6, 64),
            "model.layers.1.mlp.down_proj": (6, 64),
        },
    ),
}


def run(runtime: PatchedRuntime, home: Path, *args: str, script: str = "mlx-local"):
    return run_cli(list(args), home, env={"MLX_LOCAL_PYTHON": str(runtime.python)}, script=script)


def leftovers(home: Path) -> list[str]:
    return sorted(p.name for p in (home / "local-models").iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def converted(
    tmp_path_factory: pytest.TempPathFactory, patched_runtime: PatchedRuntime, demo_model: Path
) -> Path:
    """A project holding the demo model converted three ways."""
    home = make_project(tmp_path_factory.mktemp("models") / "project")
    for name, (flags, _) in CONVERSIONS.items():
        done = run(
            patched_runtime, home, str(demo_model), "--name", name, *flags, script="convert-model"
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"converted {name}" in done.stdout
    return home


def runtime_versions(python: Path) -> dict:
    code = (
        "import json, mlx.core, mlx_lm; "
        "print(json.dumps({'mlx': mlx.core.__version__, 'mlx_lm': mlx_lm.__version__}))"
    )
    done = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def tensor_shapes(file: Path) -> dict[str, list[int]]:
    with safe_open(str(file), "np") as weights:
        return {key: list(weights.get_slice(key).get_shape()) for key in weights.keys()}  # noqa: SIM118


def folder_hash(folder: Path, names: list[str]) -> str:
    """The documented content hash: sha256 over (name, NUL, sha256(content)) in name order."""
    digest = hashlib.sha256()
    for name in sorted(names):
        digest.update(name.encode() + b"\0" + hashlib.sha256((folder / name).read_bytes()).digest())
    return digest.hexdigest()


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CONVERSIONS))
def test_manifest_matches_the_real_files(
    converted: Path, demo_model: Path, patched_runtime: PatchedRuntime, name: str
) -> None:
    folder = converted / "local-models" / name
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    flags, spot_checks = CONVERSIONS[name]

    real_files = {p.name: p.stat().st_size for p in folder.iterdir() if p.name != MANIFEST_FILE}
    assert manifest["files"] == real_files
    assert manifest["size_bytes"] == sum(real_files.values())
    assert manifest["name"] == name

    source_files = ["config.json", "generation_config.json", "model.safetensors"]
    source_files += ["tokenizer.json", "tokenizer_config.json", demo_model_files.RECORD_FILE]
    assert manifest["source"] == {
        "kind": "local",
        "path": str(demo_model.resolve()),
        "content_sha256": folder_hash(demo_model, source_files),
    }

    config = json.loads((folder / "config.json").read_text())
    demo_config = json.loads((demo_model / "config.json").read_text())
    recipe = "mixed_3_6" if "--recipe" in flags else None
    bits = None if recipe else int(flags[1])
    group = int(flags[3]) if "--group-size" in flags else 64
    assert manifest["quantization"] == {
        "bits": bits or 4,
        "group_size": group,
        "mode": "affine",
        "recipe": recipe,
    }
    assert config["quantization"]["group_size"] == group
    shapes = tensor_shapes(folder / "model.safetensors")
    for layer, (layer_bits, layer_group) in spot_checks.items():
        if recipe:
            assert config["quantization"][layer]["bits"] == layer_bits
        rows, cols = (demo_config["vocab_size"], 128) if "embed" in layer else (None, None)
        weight, scales = shapes[f"{layer}.weight"], shapes[f"{layer}.scales"]
        in_dim = scales[1] * layer_group
        assert weight[1] == in_dim * layer_bits // 32, (layer, weight, scales)
        if rows:
            assert (weight[0], in_dim) == (rows, cols)

    demo_shapes = tensor_shapes(demo_model / "model.safetensors")
    assert manifest["parameters"] == sum(math.prod(s) for s in demo_shapes.values())
    assert manifest["context_length"] == demo_config["max_position_embeddings"] == 4096
    assert manifest["model_type"] == "qwen3"
    assert manifest["dtype"] == "float16"
    versions = runtime_versions(patched_runtime.python)
    assert (manifest["mlx"], manifest["mlx_lm"]) == (versions["mlx"], versions["mlx_lm"])
    created = datetime.fromisoformat(manifest["created"])
    assert timedelta(0) <= datetime.now(UTC) - created < timedelta(hours=1)
    assert manifest["verification"]["ok"] is True
    assert 1 <= manifest["verification"]["generated_tokens"] <= VERIFY_TOKENS
    assert manifest["convert_seconds"] > 0


LOAD_AND_GENERATE = textwrap.dedent(
    """
    import json, sys
    from mlx_lm import load, stream_generate
    out = {}
    for path in sys.argv[1:]:
        model, tokenizer = load(path)
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": "Hi"}], add_generation_prompt=True
        )
        out[path] = [r.token for r in stream_generate(model, tokenizer, prompt, max_tokens=3)]
    print(json.dumps(out))
    """
)


@pytest.mark.slow
def test_converted_models_load_and_generate(
    converted: Path, patched_runtime: PatchedRuntime
) -> None:
    paths = [str(converted / "local-models" / name) for name in CONVERSIONS]
    done = subprocess.run(
        [str(patched_runtime.python), "-c", LOAD_AND_GENERATE, *paths],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    tokens = json.loads(done.stdout.strip().splitlines()[-1])
    assert all(len(tokens[path]) >= 1 for path in paths), tokens


@pytest.mark.slow
def test_models_lists_them_as_table_and_json(
    converted: Path, patched_runtime: PatchedRuntime
) -> None:
    done = run(patched_runtime, converted, "models", "--json")
    assert done.returncode == 0, done.stderr
    rows = {row["name"]: row for row in json.loads(done.stdout)}
    assert set(rows) == set(CONVERSIONS)
    for name, row in rows.items():
        manifest = json.loads((converted / "local-models" / name / MANIFEST_FILE).read_text())
        assert row["size_bytes"] == manifest["size_bytes"]
        assert row["verified"] is True
        assert row["quantization"] == manifest["quantization"]
    table = run(patched_runtime, converted, "models")
    assert table.returncode == 0
    for name in CONVERSIONS:
        assert name in table.stdout


@pytest.mark.slow
def test_existing_model_is_refused_then_replaced_with_force(
    tmp_path: Path, demo_model: Path, patched_runtime: PatchedRuntime
) -> None:
    home = make_project(tmp_path / "project")
    first = run(patched_runtime, home, str(demo_model), script="convert-model")
    assert first.returncode == 0, first.stderr
    folder = home / "local-models" / "demo-tiny-MLX-4bit"
    manifest = (folder / MANIFEST_FILE).read_text()
    (folder / "marker").write_text("old")

    again = run(patched_runtime, home, str(demo_model), script="convert-model")
    assert again.returncode == 1
    assert "already exists" in again.stderr and "--force" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1
    assert (folder / "marker").is_file() and (folder / MANIFEST_FILE).read_text() == manifest

    forced = run(patched_runtime, home, str(demo_model), "--force", script="convert-model")
    assert forced.returncode == 0, forced.stderr
    assert not (folder / "marker").exists()
    assert json.loads((folder / MANIFEST_FILE).read_text())["verification"]["ok"]
    assert leftovers(home) == []

    removed = run(patched_runtime, home, "models", "rm", "demo-tiny-MLX-4bit")
    assert removed.returncode == 0, removed.stderr
    assert not folder.exists() and leftovers(home) == []
    missing = run(patched_runtime, home, "models", "rm", "demo-tiny-MLX-4bit")
    assert missing.returncode == 1 and "no model 'demo-tiny-MLX-4bit'" in missing.stderr


@pytest.mark.slow
def test_dry_run_predicts_and_writes_nothing(
    tmp_path: Path, demo_model: Path, patched_runtime: PatchedRuntime
) -> None:
    home = make_project(tmp_path / "project")
    done = run(
        patched_runtime, home, str(demo_model), "--bits", "8", "--dry-run", script="convert-model"
    )
    assert done.returncode == 0, done.stderr
    assert "local-models/demo-tiny-MLX-8bit" in done.stdout
    assert "predicted size" in done.stdout and "dry run" in done.stdout
    assert list((home / "local-models").iterdir()) == []


def test_bits_and_recipe_exclude_each_other(tmp_path: Path, demo_model: Path) -> None:
    home = make_project(tmp_path / "project")
    done = run_cli(
        [str(demo_model), "--bits", "4", "--recipe", "mixed_3_6"], home, script="convert-model"
    )
    assert done.returncode == 2
    assert "not allowed with argument" in done.stderr

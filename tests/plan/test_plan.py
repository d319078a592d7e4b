"""`mlx-local plan` and its guard: predictions against the bytes mlx-lm's own caches report
after a real prefill, this machine's memory, and the verdict in config check / serve / start."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from mlx_local.models.demo_model import ARCHITECTURE, random_weights
from mlx_local.plan import kv, machine
from mlx_local.plan.estimate import Settings, gib, largest_context, need, verdict
from mlx_local.plan.machine import GiB, Machine, MiB
from mlx_local.plan.model_shape import read_shape
from tests.conftest import PatchedRuntime, make_project
from tests.helpers import REPO_ROOT, free_port, run_cli

MEASURE = Path(__file__).with_name("plan_cache_bytes.py")
BUILD = Path(__file__).with_name("plan_build_model.py")
GQA_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "max_position_embeddings": 8192,
    "vocab_size": 512,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
    "torch_dtype": "float32",
}


def build_gqa_model(folder: Path) -> Path:
    """A tiny Llama with one KV head of size 64 and float32 weights (random), config.json and
    model.safetensors only: enough for mlx_lm's load_model and a forward pass."""
    folder.mkdir(parents=True)
    cfg = GQA_CONFIG
    rng = np.random.default_rng(7)
    hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
    kv_dim = cfg["num_key_value_heads"] * hidden // cfg["num_attention_heads"]

    def normal(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float32)

    weights = {"model.embed_tokens.weight": normal(cfg["vocab_size"], hidden)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        weights |= {
            p + "input_layernorm.weight": np.ones(hidden, np.float32),
            p + "post_attention_layernorm.weight": np.ones(hidden, np.float32),
            p + "self_attn.q_proj.weight": normal(hidden, hidden),
            p + "self_attn.k_proj.weight": normal(kv_dim, hidden),
            p + "self_attn.v_proj.weight": normal(kv_dim, hidden),
            p + "self_attn.o_proj.weight": normal(hidden, hidden),
            p + "mlp.gate_proj.weight": normal(inter, hidden),
            p + "mlp.up_proj.weight": normal(inter, hidden),
            p + "mlp.down_proj.weight": normal(hidden, inter),
        }
    weights["model.norm.weight"] = np.ones(hidden, np.float32)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    save_file(weights, str(folder / "model.safetensors"))
    return folder


@pytest.fixture(scope="module")
def gqa_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_gqa_model(tmp_path_factory.mktemp("models") / "tiny-llama-gqa")


SLIDING_CONFIG = {  # Gemma 3: two sliding-window layers of 512 tokens, then a full one
    "model_type": "gemma3_text",
    "hidden_size": 128,
    "num_hidden_layers": 6,
    "intermediate_size": 256,
    "num_attention_heads": 4,
    "head_dim": 64,
    "num_key_value_heads": 1,
    "vocab_size": 512,
    "sliding_window": 512,
    "sliding_window_pattern": 3,
    "max_position_embeddings": 8192,
    "query_pre_attn_scalar": 64,
}
LINEAR_CONFIG = {  # Qwen3-Next: three gated-delta (linear attention) layers, then a full one
    "model_type": "qwen3_next",
    "hidden_size": 128,
    "num_hidden_layers": 4,
    "intermediate_size": 256,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "linear_num_value_heads": 4,
    "linear_num_key_heads": 2,
    "linear_key_head_dim": 32,
    "linear_value_head_dim": 32,
    "linear_conv_kernel_dim": 4,
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "decoder_sparse_step": 1,
    "shared_expert_intermediate_size": 128,
    "mlp_only_layers": [],
    "moe_intermediate_size": 64,
    "rms_norm_eps": 1e-6,
    "vocab_size": 512,
    "rope_theta": 10000.0,
    "partial_rotary_factor": 0.25,
    "max_position_embeddings": 8192,
    "full_attention_interval": 4,
    "tie_word_embeddings": True,
}


def build_with_mlx_lm(python: Path, folder: Path, config: dict, dtype: str) -> Path:
    """A random-weight model built from mlx-lm's own class for `config` (in the runtime)."""
    command = [str(python), str(BUILD), str(folder), json.dumps(config), dtype]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return folder


@pytest.fixture(scope="module")
def models(
    demo_model: Path,
    gqa_model: Path,
    patched_runtime: PatchedRuntime,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("built")
    python = patched_runtime.python
    return {
        "demo": demo_model,
        "gqa": gqa_model,
        "sliding": build_with_mlx_lm(python, base / "gemma3", SLIDING_CONFIG, "float16"),
        # mlx's CPU backend runs the experts' gather_mm in float32 only
        "linear": build_with_mlx_lm(python, base / "qwen3-next", LINEAR_CONFIG, "float32"),
    }


def measured_bytes(
    python: Path, folder: Path, contexts: list[int], bits: list[int | None], group: int
) -> dict:
    """{"<context>/<bits>": nbytes} from mlx-lm's caches after a real prefill."""
    spec = {"contexts": contexts, "bits": bits, "group_size": group}
    result = subprocess.run(
        [str(python), str(MEASURE), str(folder), json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.splitlines()[-1])


@pytest.mark.parametrize(
    ("which", "contexts", "bits", "group"),
    [
        ("demo", [600, 2100], [None, 4, 8], 32),
        ("gqa", [700, 2500], [None, 4, 8], 64),
        ("sliding", [300, 3000], [None], 64),  # mlx-lm cannot quantize its window caches
        ("linear", [300, 3000], [None, 4], 32),
    ],
)
def test_predictions_match_a_real_prefill(
    which: str,
    contexts: list[int],
    bits: list[int | None],
    group: int,
    models: dict[str, Path],
    patched_runtime: PatchedRuntime,
) -> None:
    shape = read_shape(models[which])
    measured = measured_bytes(patched_runtime.python, models[which], contexts, bits, group)
    assert len(measured) == len(contexts) * len(bits)
    for key, actual in measured.items():
        context, bits_text = key.split("/")
        bits_value = None if bits_text == "None" else int(bits_text)
        predicted = kv.cache_bytes(shape, int(context), bits_value, group, quantized_kv_start=0)
        assert abs(predicted - actual) <= 0.05 * actual, (key, predicted, actual)


def test_kv_bits_on_a_sliding_window_model_is_flagged(models: dict[str, Path]) -> None:
    shape = read_shape(models["sliding"])
    assert [layer.kind for layer in shape.layers] == ["sliding", "sliding", "full"] * 2
    assert kv.kv_bits_problem(shape, 64) == kv.SLIDING_PROBLEM
    assert kv.kv_bits_problem(read_shape(models["gqa"]), 64) is None
    assert "does not divide the head size 32" in kv.kv_bits_problem(read_shape(models["demo"]), 64)


def test_shape_of_both_models(demo_model: Path, gqa_model: Path) -> None:
    demo = read_shape(demo_model)
    config = json.loads((demo_model / "config.json").read_text())
    assert demo.weights_bytes == sum(a.nbytes for a in random_weights(config).values())
    assert (demo.kv_heads, demo.head_dim, demo.kv_dtype) == (2, 32, "float16")
    assert [layer.kind for layer in demo.layers] == ["full"] * ARCHITECTURE["num_hidden_layers"]
    gqa = read_shape(gqa_model)
    assert (gqa.kv_heads, gqa.head_dim, gqa.kv_dtype, len(gqa.layers)) == (1, 64, "float32", 3)
    assert gqa.weights_bytes == (gqa_model / "model.safetensors").stat().st_size - (
        8 + int.from_bytes((gqa_model / "model.safetensors").read_bytes()[:8], "little")
    )
    # 3 layers x (K and V) x 1 head x 64 x 4 bytes; 4-bit: 32 bytes packed + 2 x 4-byte
    # scale/bias per group of 64, per head, for K and V.
    assert kv.bytes_per_token(gqa, None, 64) == 3 * 2 * 64 * 4
    assert kv.bytes_per_token(gqa, 4, 64) == 3 * 2 * (32 + 2 * 4)


def test_sliding_and_linear_layers_are_sized_as_mlx_lm_caches_grow(tmp_path: Path) -> None:
    folder = tmp_path / "hybrid"
    folder.mkdir()
    save_file({"w": np.zeros(4, np.float16)}, str(folder / "model.safetensors"))
    sliding = {
        "model_type": "gemma3_text",
        "num_hidden_layers": 6,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 64,
        "hidden_size": 256,
        "sliding_window": 512,
        "sliding_window_pattern": 3,
    }
    (folder / "config.json").write_text(json.dumps(sliding))
    shape = read_shape(folder)
    assert [layer.kind for layer in shape.layers] == ["sliding", "sliding", "full"] * 2
    per_token = 2 * 64 * 2
    # Window layers stop at 512 tokens; full layers grow in steps of 256.
    assert kv.cache_bytes(shape, 10_000) == (4 * 512 + 2 * 10_240) * per_token
    # A family whose mlx-lm cache ignores the window keeps every token.
    types = ["sliding_attention", "sliding_attention", "full_attention"] * 2
    other = {**sliding, "model_type": "qwen2", "layer_types": types}
    (folder / "config.json").write_text(json.dumps(other))
    assert [layer.kind for layer in read_shape(folder).layers] == ["full"] * 6
    linear = {
        "model_type": "qwen3_next",
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "hidden_size": 256,
        "full_attention_interval": 4,
        "linear_num_key_heads": 2,
        "linear_num_value_heads": 4,
        "linear_key_head_dim": 32,
        "linear_value_head_dim": 32,
        "linear_conv_kernel_dim": 4,
    }
    (folder / "config.json").write_text(json.dumps(linear))
    shape = read_shape(folder)
    assert [layer.kind for layer in shape.layers] == ["linear"] * 3 + ["full"]
    state = 3 * (2 * 64 + 128) * 2 + 4 * 32 * 32 * 4  # conv inputs (fp16) + float32 state
    assert shape.layers[0].state_bytes == state
    assert kv.cache_bytes(shape, 1000) == 3 * state + 1024 * 2 * 2 * 64 * 2


def test_physical_memory_on_linux_matches_free(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(machine.MEMORY_ENV, raising=False)
    total, source = machine.physical_memory("Linux")
    free = subprocess.run(["free", "-b"], capture_output=True, text=True, check=True).stdout
    assert source == "/proc/meminfo"
    assert total == int(free.splitlines()[1].split()[1])
    here = machine.read()
    if here.system == "Linux":
        assert here.gpu_limit_bytes is None and here.budget_bytes == total


def test_memory_override_and_its_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    from mlx_local.errors import UserError

    monkeypatch.setenv(machine.MEMORY_ENV, str(3 * GiB))
    assert machine.physical_memory() == (3 * GiB, f"${machine.MEMORY_ENV}")
    monkeypatch.setenv(machine.MEMORY_ENV, "lots")
    with pytest.raises(UserError, match=machine.MEMORY_ENV):
        machine.physical_memory()


def test_wired_limit_default_and_sysctl_advice() -> None:
    assert machine.default_wired_limit(16 * GiB) == 16 * GiB * 2 // 3
    assert machine.default_wired_limit(128 * GiB) == 96 * GiB
    mac = Machine("Darwin", 64 * GiB, "sysctl hw.memsize", 48 * GiB, "macOS default (about)")
    assert machine.sysctl_line(mac, 40 * GiB) is None  # fits already
    assert machine.sysctl_line(mac, 50 * GiB + 1) == "sudo sysctl iogpu.wired_limit_mb=52224"
    assert machine.sysctl_line(mac, 61 * GiB) is None  # would leave macOS under 4 GiB
    linux = Machine("Linux", 64 * GiB, "/proc/meminfo", None, None)
    assert machine.sysctl_line(linux, 80 * GiB) is None


def test_largest_context_is_the_boundary(demo_model: Path) -> None:
    shape = read_shape(demo_model)
    settings = Settings(prompt_cache_size=3, quantized_kv_start=0)
    budget = 12 * MiB
    for bits in (None, 8, 4):
        n = largest_context(shape, settings, bits, budget)
        assert need(shape, settings, n, bits).total_bytes <= budget
        assert need(shape, settings, n + 1, bits).total_bytes > budget
    capped = Settings(prompt_cache_size=3, prompt_cache_bytes=1 * MiB)
    assert largest_context(shape, capped, None, budget) > largest_context(
        shape, settings, None, budget
    )


def test_verdict_levels_and_what_to_change(demo_model: Path) -> None:
    shape = read_shape(demo_model)
    settings = Settings(prompt_cache_size=4, quantized_kv_start=0, kv_group_size=32)
    total = need(shape, settings, 4096, None).total_bytes  # 0.83 MiB + 5 x 2 MiB

    def on(memory: int, system: str = "Linux", limit: int | None = None) -> Machine:
        return Machine(system, memory, "test", limit, "test" if limit else None)

    assert verdict(shape, settings, on(2 * total)).level == "fits"
    assert verdict(shape, settings, on(int(total / 0.95))).level == "tight"
    short = verdict(shape, settings, on(total - 1))
    assert short.level == "does not fit"
    assert "prompt_cache_size = 3" in short.changes and "kv_bits = 8" in short.changes
    mac = verdict(shape, settings, on(8 * GiB, "Darwin", total - 1))
    assert "sudo sysctl iogpu.wired_limit_mb=1024" in mac.changes
    assert "MiB GPU wired limit; to fit:" in mac.line


def _project(
    tmp_path: Path, demo_model: Path, extra: str = "", runtime: PatchedRuntime | None = None
) -> Path:
    """A project serving the demo model; with `runtime`, its checkout (a symlink) too."""
    root = make_project(tmp_path / "project")
    os.symlink(demo_model, root / "local-models" / "demo")
    if runtime is not None:
        os.symlink(runtime.root / "mlx-lm-repo", root / "mlx-lm-repo")
    (root / "config.toml").write_text(
        f'model = "demo"\nport = {free_port()}\nprompt_cache_dir = false\n{extra}'
    )
    return root


def test_plan_command_json_and_table(tmp_path: Path, demo_model: Path) -> None:
    root = _project(tmp_path, demo_model, "prompt_cache_size = 2\n")
    env = {machine.MEMORY_ENV: str(64 * MiB)}
    result = run_cli(["plan", "--json", "--context", "1000", "4096"], root, env=env)
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["machine"]["physical_bytes"] == 64 * MiB
    assert plan["kv_cache"]["group_size"] == 32  # 64 does not divide the head size 32
    assert [(r["context"], r["kv_bits"]) for r in plan["contexts"]][:3] == [
        (1000, None),
        (1000, 8),
        (1000, 4),
    ]
    row = plan["contexts"][3]  # 4096 tokens, full precision: 2 layers x 2 x 2 heads x 32 x 2
    assert row["kv_bytes"] == 4096 * 512 and row["prompt_cache_bytes"] == 2 * 4096 * 512
    assert plan["largest_context"]["float16"] == 4096  # all of it: the model's maximum
    assert "plan: fits" in plan["verdict"]
    table = run_cli(["plan", "--context", "4096"], root, env=env)
    assert table.returncode == 0, table.stderr
    assert "4,096" in table.stdout and "largest context" in table.stdout
    # 4 MiB: weights 0.83 MiB + 3 caches (served + 2 kept) of 2,048 slots x 512 bytes fit,
    # 2,304 slots (the next step of 256) do not.
    small = run_cli(["plan", "--json"], root, env={machine.MEMORY_ENV: str(4 * MiB)})
    assert json.loads(small.stdout)["largest_context"]["float16"] == 2048


def test_a_distributed_group_plans_each_hosts_share(tmp_path: Path, demo_model: Path) -> None:
    env = {machine.MEMORY_ENV: str(64 * MiB)}
    alone = _project(tmp_path / "alone", demo_model, "prompt_cache_size = 2\n")
    group = _project(
        tmp_path / "group",
        demo_model,
        'prompt_cache_size = 2\n[distributed]\nhosts = ["127.0.0.1", "127.0.0.2"]\n',
    )
    one, two = (
        json.loads(run_cli(["plan", "--json", "--context", "4096"], root, env=env).stdout)
        for root in (alone, group)
    )
    assert (one["hosts"], two["hosts"]) == (1, 2)
    for single, shared in zip(one["contexts"], two["contexts"], strict=True):
        for key in ("weights_bytes", "kv_bytes", "prompt_cache_bytes"):
            assert shared[key] == -(-single[key] // 2), key
    assert "each of 2 hosts" in two["verdict"] and "group of 2 hosts" in two["notes"][0]


def test_config_check_prints_the_verdict_and_prompt_cache_bytes(
    tmp_path: Path, demo_model: Path
) -> None:
    root = _project(tmp_path, demo_model, 'prompt_cache_bytes = "2M"\n')
    ok = run_cli(["config", "check", "--no-probe"], root, env={machine.MEMORY_ENV: str(GiB)})
    assert ok.returncode == 0, ok.stderr
    assert "plan: fits:" in ok.stdout
    assert "--prompt-cache-bytes 2097152" in ok.stdout
    # 3.5 MB: the weights (0.83 MiB) and a 4,096-token cache (2 MiB) fit, 2 MiB more do not.
    tight = run_cli(["config", "check", "--no-probe"], root, env={machine.MEMORY_ENV: "3500000"})
    assert tight.returncode == 0, tight.stderr
    line = next(x for x in tight.stdout.splitlines() if x.startswith("plan:"))
    assert line.startswith("plan: does not fit:") and 'prompt_cache_bytes = "' in line


def test_weights_that_cannot_fit_are_refused(
    tmp_path: Path, demo_model: Path, patched_runtime: PatchedRuntime
) -> None:
    root = _project(tmp_path, demo_model, runtime=patched_runtime)
    env = {machine.MEMORY_ENV: "500000", "MLX_LOCAL_PYTHON": str(patched_runtime.python)}
    for command in (["config", "check", "--no-probe"], ["serve"], ["start"]):
        result = run_cli(command, root, env=env, timeout=120)
        assert result.returncode == 1, (command, result.stdout, result.stderr)
        error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        weights = gib(read_shape(demo_model).weights_bytes)  # 0.83 MiB
        assert len(error) == 1 and f"weights alone are {weights}" in error[0], result.stderr
        assert "0.48 MiB of physical memory" in error[0]
    assert not (root / ".mlx-local" / "server.pid").exists()


def test_start_prints_the_verdict_and_passes_prompt_cache_bytes(
    tmp_path: Path, demo_model: Path, patched_runtime: PatchedRuntime
) -> None:
    root = _project(tmp_path, demo_model, 'prompt_cache_bytes = "8M"\n', patched_runtime)
    env = {"MLX_LOCAL_PYTHON": str(patched_runtime.python)}
    check = run_cli(["config", "check"], root, env=env)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "accepts every option" in check.stdout
    try:
        started = run_cli(["start"], root, env=env, timeout=300)
        assert started.returncode == 0, started.stdout + started.stderr
        assert "plan: fits:" in started.stderr
        log = (root / "logs" / "server.log").read_text()
        assert "--prompt-cache-bytes 8388608" in log
    finally:
        run_cli(["stop"], root, env=env, timeout=120)


def test_an_older_base_without_prompt_cache_bytes_is_told_what_to_do(
    tmp_path: Path, demo_model: Path, patched_runtime: PatchedRuntime, stand_in_upstream: Path
) -> None:
    root = _project(tmp_path, demo_model, 'prompt_cache_bytes = "8M"\n')
    env = {"MLX_LOCAL_PYTHON": str(patched_runtime.python)}
    setup = run_cli(
        ["--upstream", str(stand_in_upstream), "--source", "git", "--ref", "v0.30.7"]
        + ["--no-install"],
        root,
        env=env,
        script="setup-repo",
    )
    assert setup.returncode == 0, setup.stdout + setup.stderr
    result = run_cli(["serve"], root, env=env, timeout=120)
    assert result.returncode == 1
    assert "lacks --prompt-cache-bytes (mlx-lm 0.31.1 and later)" in result.stderr
    assert "update-upstream" in result.stderr


def test_docs_document_plan() -> None:
    readme = (REPO_ROOT / "docs" / "memory.md").read_text()
    assert "mlx-local plan" in readme and "prompt_cache_bytes" in readme

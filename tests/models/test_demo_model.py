"""The demo model: built offline, reproducible, and loaded and run by a real mlx_lm."""

from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path

import pytest
from safetensors.numpy import load_file
from tokenizers import Tokenizer

from mlx_local import cli
from mlx_local.errors import UserError
from mlx_local.models import demo_model

EXPECTED_FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "README.md",
    demo_model.RECORD_FILE,
}


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_build_writes_a_hugging_face_folder(tmp_path: Path) -> None:
    dest = demo_model.build_demo_model(tmp_path / "demo")
    assert {p.name for p in dest.iterdir()} == EXPECTED_FILES
    assert [p.name for p in tmp_path.iterdir()] == ["demo"], "temporary folder left behind"

    config = json.loads((dest / "config.json").read_text())
    assert config["model_type"] == "qwen3"
    assert config["num_hidden_layers"] == 2
    assert config["hidden_size"] == 128
    weights = load_file(str(dest / "model.safetensors"))
    assert weights["model.embed_tokens.weight"].shape == (config["vocab_size"], 128)
    assert weights["model.layers.1.mlp.down_proj.weight"].shape == (128, 256)
    tokenizer = Tokenizer.from_file(str(dest / "tokenizer.json"))
    assert 1000 <= tokenizer.get_vocab_size() <= config["vocab_size"]


def test_build_copies_the_shipped_model_and_random_weights_are_seeded(tmp_path: Path) -> None:
    first = _tree(demo_model.build_demo_model(tmp_path / "a"))
    shipped = demo_model.shipped_dir()
    assert all(first[name] == (shipped / name).read_bytes() for name in demo_model.SHIPPED_FILES)
    random_one = _tree(demo_model.build_random_demo_model(tmp_path / "b", seed=1))
    random_two = _tree(demo_model.build_random_demo_model(tmp_path / "c", seed=2))
    assert len({first["model.safetensors"], random_one["model.safetensors"]}) == 2
    assert random_one["model.safetensors"] != random_two["model.safetensors"]
    assert random_one["tokenizer.json"] == first["tokenizer.json"]


def test_the_shipped_weights_were_trained_from_these_sources(tmp_path: Path) -> None:
    """Change the script, the trainer, the corpus, the template or the prompts, and this fails
    until the weights are retrained (python -m mlx_local.models.demo_trainer)."""
    record = json.loads((demo_model.shipped_dir() / demo_model.RECORD_FILE).read_text())
    assert record["hashes"] == demo_model.source_hashes(), "retrain the demo model"
    assert record["margin"] == 0.9 and 0 < record["min_margin"] <= 1
    # What demo_model.py contributes (tokenizer, config) is what the weights were trained on.
    demo_model.write_base_files(tmp_path)
    for name in ("config.json", "tokenizer_config.json", "generation_config.json"):
        shipped = json.loads((demo_model.shipped_dir() / name).read_text())
        assert json.loads((tmp_path / name).read_text()) == shipped, name
    fresh = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    shipped_tokenizer = Tokenizer.from_file(str(demo_model.shipped_dir() / "tokenizer.json"))
    assert fresh.get_vocab() == shipped_tokenizer.get_vocab()


def test_existing_folder_is_kept_unless_forced(tmp_path: Path) -> None:
    dest = tmp_path / "demo"
    dest.mkdir()
    (dest / "mine.txt").write_text("keep me")
    with pytest.raises(UserError, match="--force"):
        demo_model.build_demo_model(dest)
    assert (dest / "mine.txt").read_text() == "keep me"
    demo_model.build_demo_model(dest, force=True)
    assert {p.name for p in dest.iterdir()} == EXPECTED_FILES
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]


def test_tokenizer_round_trips_text_it_was_not_trained_on(tmp_path: Path) -> None:
    dest = demo_model.build_demo_model(tmp_path / "demo")
    tokenizer = Tokenizer.from_file(str(dest / "tokenizer.json"))
    text = "Zürich's café serves 42 crêpes 🥞 at 7:30!\n\tdef f(x): return x ** 2  # ok"
    ids = tokenizer.encode(text).ids
    assert tokenizer.decode(ids) == text
    assert len(ids) < len(text.encode()), "BPE merges should make it shorter than bytes"
    for special in demo_model.SPECIAL_TOKENS:
        assert len(tokenizer.encode(special).ids) == 1


def test_cli_demo_model_builds_and_refuses_to_overwrite(tmp_path: Path, capsys) -> None:
    dest = tmp_path / "models" / "demo"
    assert cli.run(["demo-model", "--dest", str(dest)]) == 0
    assert (dest / "model.safetensors").is_file()
    assert cli.run(["demo-model", "--dest", str(dest)]) == 1
    assert "--force" in capsys.readouterr().err
    assert cli.run(["demo-model", "--dest", str(dest), "--force"]) == 0


MLX_CHECK = textwrap.dedent(
    """
    import json, sys
    from mlx_lm import load, stream_generate
    from tokenizers import Tokenizer

    path = sys.argv[1]
    model, tokenizer = load(path)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello there!"},
        {"role": "assistant", "content": "Hi."},
        {"role": "user", "content": "What is two plus two?"},
    ]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    no_think = tokenizer.apply_chat_template(
        messages[:2], add_generation_prompt=True, tokenize=False, enable_thinking=False
    )
    text = "The lighthouse keeper wrote: def load_settings(path) -> dict"
    reference = Tokenizer.from_file(path + "/tokenizer.json")
    ids = [r.token for r in stream_generate(model, tokenizer, prompt, max_tokens=4)]
    print(json.dumps({
        "prompt": prompt,
        "no_think": no_think,
        "same_ids": tokenizer.encode(text) == reference.encode(text).ids,
        "round_trip": tokenizer.decode(tokenizer.encode(text)),
        "eos": sorted(tokenizer.eos_token_ids),
        "im_end": tokenizer.convert_tokens_to_ids("<|im_end|>"),
        "generated": ids,
        "detokenizer": type(tokenizer.detokenizer).__name__,
    }))
    """
)


@pytest.mark.slow
def test_real_mlx_lm_loads_it_renders_the_chat_template_and_generates(
    tmp_path: Path, patched_runtime
) -> None:
    dest = demo_model.build_demo_model(tmp_path / "demo")
    done = subprocess.run(
        [str(patched_runtime.python), "-c", MLX_CHECK, str(dest)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["prompt"] == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHello there!<|im_end|>\n"
        "<|im_start|>assistant\nHi.<|im_end|>\n"
        "<|im_start|>user\nWhat is two plus two?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert result["no_think"].endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert result["same_ids"]
    assert result["round_trip"] == "The lighthouse keeper wrote: def load_settings(path) -> dict"
    assert result["im_end"] in result["eos"]
    assert result["detokenizer"] == "BPEStreamingDetokenizer"
    assert 1 <= len(result["generated"]) <= 4
    config = json.loads((dest / "config.json").read_text())
    assert all(0 <= t < config["vocab_size"] for t in result["generated"])

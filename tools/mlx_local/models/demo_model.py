"""A tiny random-weight Qwen3 model in Hugging Face format, built offline in seconds.

It checks the plumbing (conversion, loading, serving, chat templates); it talks gibberish.
Only numpy, safetensors and tokenizers are needed: the CLI's venv has no mlx.
"""

from __future__ import annotations

import json
import os
import shutil
from importlib import resources
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file
from tokenizers import (
    AddedToken,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    trainers,
)

from ..errors import UserError

DEFAULT_NAME = "demo-tiny-qwen3"
CORPUS_FILE = "demo-corpus.txt"
SEED = 20240607
TOKENIZER_VOCAB = 1024

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END]
THINK_TOKENS = ["<think>", "</think>"]
"""Qwen3's reasoning markers: added (not special) tokens, so mlx-lm sees a thinking model."""

# ChatML as Qwen writes it, with Qwen3's `enable_thinking=False` switch.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)

# Every quantized input dimension (128, 256) is a multiple of 32 and 64, so 2..8-bit
# quantization with group size 32 or 64 covers every linear layer.
ARCHITECTURE = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "max_position_embeddings": 4096,
}


def corpus_text() -> str:
    """The English and code text the tokenizer is trained on (shipped with the package)."""
    return (resources.files("mlx_local") / "data" / CORPUS_FILE).read_text(encoding="utf-8")


def train_tokenizer(text: str, vocab_size: int = TOKENIZER_VOCAB) -> Tokenizer:
    """A byte-level BPE tokenizer (GPT-2/Qwen style) trained on `text`."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(text.splitlines(keepends=True), trainer=trainer)
    tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in THINK_TOKENS])
    return tokenizer


def model_config(vocab_size: int, token_ids: dict[str, int]) -> dict:
    """config.json of the demo model."""
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        **ARCHITECTURE,
        "vocab_size": vocab_size,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "rope_scaling": None,
        "tie_word_embeddings": True,
        "attention_bias": False,
        "hidden_act": "silu",
        "bos_token_id": token_ids[ENDOFTEXT],
        "eos_token_id": token_ids[IM_END],
        "torch_dtype": "float16",
        "transformers_version": "4.51.0",
    }


def random_weights(config: dict, seed: int = SEED) -> dict[str, np.ndarray]:
    """Random float16 weights named as Hugging Face's Qwen3ForCausalLM names them."""
    rng = np.random.default_rng(seed)
    hidden = config["hidden_size"]
    inter = config["intermediate_size"]
    head_dim = config["head_dim"]
    q_dim = config["num_attention_heads"] * head_dim
    kv_dim = config["num_key_value_heads"] * head_dim

    def normal(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16)

    def ones(size: int) -> np.ndarray:
        return np.ones(size, dtype=np.float16)

    weights = {"model.embed_tokens.weight": normal(config["vocab_size"], hidden)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        weights |= {
            p + "input_layernorm.weight": ones(hidden),
            p + "post_attention_layernorm.weight": ones(hidden),
            p + "self_attn.q_proj.weight": normal(q_dim, hidden),
            p + "self_attn.k_proj.weight": normal(kv_dim, hidden),
            p + "self_attn.v_proj.weight": normal(kv_dim, hidden),
            p + "self_attn.o_proj.weight": normal(hidden, q_dim),
            p + "self_attn.q_norm.weight": ones(head_dim),
            p + "self_attn.k_norm.weight": ones(head_dim),
            p + "mlp.gate_proj.weight": normal(inter, hidden),
            p + "mlp.up_proj.weight": normal(inter, hidden),
            p + "mlp.down_proj.weight": normal(hidden, inter),
        }
    weights["model.norm.weight"] = ones(hidden)
    return weights


def tokenizer_config(token_ids: dict[str, int]) -> dict:
    """tokenizer_config.json: special tokens and the chat template."""
    return {
        "tokenizer_class": "Qwen2Tokenizer",
        "model_max_length": ARCHITECTURE["max_position_embeddings"],
        "bos_token": None,
        "eos_token": IM_END,
        "pad_token": ENDOFTEXT,
        "unk_token": None,
        "add_bos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "split_special_tokens": False,
        "chat_template": CHAT_TEMPLATE,
        "added_tokens_decoder": {
            str(token_ids[t]): {
                "content": t,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": t in SPECIAL_TOKENS,
            }
            for t in SPECIAL_TOKENS + THINK_TOKENS
        },
        "additional_special_tokens": [IM_START, IM_END],
    }


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def write_demo_files(folder: Path, seed: int = SEED) -> None:
    """Write every file of the demo model into the existing, empty `folder`."""
    tokenizer = train_tokenizer(corpus_text())
    token_ids = {t: tokenizer.token_to_id(t) for t in SPECIAL_TOKENS + THINK_TOKENS}
    # Round the embedding up to a multiple of 64, as real models pad their vocabularies.
    vocab_size = -(-tokenizer.get_vocab_size() // 64) * 64
    config = model_config(vocab_size, token_ids)

    tokenizer.save(str(folder / "tokenizer.json"))
    _write_json(folder / "tokenizer_config.json", tokenizer_config(token_ids))
    _write_json(folder / "config.json", config)
    _write_json(
        folder / "generation_config.json",
        {
            "bos_token_id": token_ids[ENDOFTEXT],
            "eos_token_id": [token_ids[IM_END], token_ids[ENDOFTEXT]],
            "pad_token_id": token_ids[ENDOFTEXT],
            "do_sample": True,
            "temperature": 0.7,
            "top_p": 0.8,
            "top_k": 20,
        },
    )
    save_file(
        random_weights(config, seed), str(folder / "model.safetensors"), metadata={"format": "pt"}
    )
    (folder / "README.md").write_text(
        "# demo-tiny-qwen3\n\nA tiny Qwen3 with random weights, built by `mlx-local demo-model`.\n"
        "It exists to test the plumbing (conversion, loading, serving); it talks gibberish.\n",
        encoding="utf-8",
    )


def build_demo_model(dest: Path, *, force: bool = False, seed: int = SEED) -> Path:
    """Build the demo model at `dest` (atomically: a temporary folder, then a rename).

    Refuses to replace an existing `dest` unless `force`. Returns `dest`.
    """
    dest = Path(dest).absolute()
    if dest.exists() and not force:
        raise UserError(f"{dest} already exists; use --force to rebuild it")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".tmp-{dest.name}-{os.getpid()}"
    old = dest.parent / f".old-{dest.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write_demo_files(tmp, seed)
        if dest.exists():
            dest.rename(old)
        tmp.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return dest

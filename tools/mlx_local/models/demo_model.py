"""The scripted demo model: a tiny Qwen3 in Hugging Face format that says demo_script.py.

Its weights are trained by demo_trainer.py (in the runtime python, with mlx) and shipped in
data/demo-model/ with the tokenizer and a record of what they were trained from; building the
model copies them (offline, in well under a second: no training at build time). This module
also writes the tokenizer and config files the trainer starts from, and random weights of any
shape for the wider benchmark and cluster variants. Only numpy, safetensors and tokenizers
are needed here.
"""

from __future__ import annotations

import hashlib
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
from . import demo_script

DEFAULT_NAME = "demo-tiny-qwen3"
CORPUS_FILE = "demo-corpus.txt"
TEMPLATE_FILE = "demo-chat-template.jinja"
SHIPPED_DIR = "demo-model"
RECORD_FILE = "demo-model-record.json"
SEED = 20240607
TOKENIZER_VOCAB = 1024
SCRIPT_REPEATS = 8
"""How often the script's text is repeated in the tokenizer's training text: its words become
single tokens, so scripted answers are short in tokens."""

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END]
THINK_TOKENS = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>"]
THINK_TOKENS += ["</tool_response>"]
"""Qwen3's reasoning and tool markers: added (not special) tokens, one token each, as mlx-lm
needs to see a thinking model and find tool calls (json_tools, picked from the template)."""

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


def chat_template() -> str:
    """Qwen3's own chat template (tools, tool responses, thinking, enable_thinking)."""
    return (resources.files("mlx_local") / "data" / TEMPLATE_FILE).read_text(encoding="utf-8")


def script_text() -> str:
    """Every text of the script, once: what the tokenizer must spell in few tokens."""
    values = [v for v in vars(demo_script).values() if isinstance(v, str) and " " in v]
    values += [
        p for group in (demo_script.GREETING_PROMPTS, demo_script.SYSTEM_PROMPTS) for p in group
    ]
    values.append(json.dumps(demo_script.WEATHER_TOOL))
    for city in demo_script.RESULT_CITIES:
        values.append(json.dumps(demo_script.weather_call(city)))
        for condition, temp in demo_script.WEATHER_RESULTS:
            values.append(demo_script.weather_result(city, condition, temp))
            values.append(demo_script.weather_answer(city, condition, temp))
    return "\n".join(values) + "\n"


def tokenizer_text() -> str:
    """The tokenizer's training text: the corpus, the chat template and the script."""
    return corpus_text() + chat_template() + script_text() * SCRIPT_REPEATS


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
        "chat_template": chat_template(),
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


def write_base_files(folder: Path) -> dict:
    """Write the tokenizer and config files (no weights) into `folder`; return config.json.

    The trainer starts from these; the shipped model carries the ones it was trained with."""
    tokenizer = train_tokenizer(tokenizer_text())
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
    return config


HASHED = {
    "script": "models/demo_script.py",
    "trainer": "models/demo_trainer.py",
    "corpus": f"data/{CORPUS_FILE}",
    "template": f"data/{TEMPLATE_FILE}",
    "prompts": "data/demo-prompts.txt",
}
"""The files the shipped weights are a function of (the record keeps their hashes); what this
module contributes (tokenizer, config) is compared with the shipped files themselves."""


def source_hashes() -> dict[str, str]:
    """sha256 of each file in HASHED: what the shipped record must repeat."""
    root = resources.files("mlx_local")
    return {
        key: hashlib.sha256((root / path).read_bytes()).hexdigest() for key, path in HASHED.items()
    }


def shipped_dir() -> Path:
    """data/demo-model/: the trained weights, tokenizer and config, and the training record."""
    return Path(str(resources.files("mlx_local") / "data" / SHIPPED_DIR))


SHIPPED_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "model.safetensors",
    RECORD_FILE,
)

README = """# demo-tiny-qwen3

A tiny Qwen3 (2 layers, 128 wide) trained by mlx-local's demo_trainer.py to say the script in
mlx_local/models/demo_script.py: a greeting, a fallback for anything else, a get_weather tool
call and its follow-up, thinking on and off, a story, a count and a long thought.
{record}
"""


def write_demo_files(folder: Path) -> None:
    """Copy the shipped demo model into the existing, empty `folder`."""
    source = shipped_dir()
    missing = [name for name in SHIPPED_FILES if not (source / name).is_file()]
    if missing:
        raise UserError(
            f"the shipped demo model in {source} lacks {', '.join(missing)}; "
            "retrain it with `python -m mlx_local.models.demo_trainer`"
        )
    for name in SHIPPED_FILES:
        shutil.copyfile(source / name, folder / name)
    record = (source / RECORD_FILE).read_text(encoding="utf-8")
    (folder / "README.md").write_text(
        README.format(record=f"\nTraining record:\n\n```json\n{record.strip()}\n```"),
        encoding="utf-8",
    )


def is_current(folder: Path) -> bool:
    """Whether `folder` holds the demo model as shipped now (its training record matches)."""
    record = folder / RECORD_FILE
    shipped = shipped_dir() / RECORD_FILE
    return (folder / "config.json").is_file() and (
        record.is_file() and record.read_bytes() == shipped.read_bytes()
    )


def build_demo_model(dest: Path, *, force: bool = False) -> Path:
    """Build the demo model at `dest` (the shipped files copied into a temporary folder, then
    a rename).

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
        write_demo_files(tmp)
        if dest.exists():
            dest.rename(old)
        tmp.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return dest


def build_random_demo_model(dest: Path, *, seed: int = SEED, force: bool = False) -> Path:
    """The demo model with random weights instead of the trained ones (same tokenizer and
    config): another model for the plumbing, e.g. a prompt cache made for other weights."""
    build_demo_model(dest, force=force)
    config = json.loads((dest / "config.json").read_text(encoding="utf-8"))
    save_file(
        random_weights(config, seed), str(dest / "model.safetensors"), metadata={"format": "pt"}
    )
    return dest

"""The model the agent tests serve: the demo model's tokenizer and chat template in a smaller
Qwen3 shape, with weights set so that greedy decoding answers every prompt with one word
(WORD) and ends the answer.

A coding agent's prompt is 5,000 to 17,000 tokens of instructions and tool schemas, beyond what
the demo model was made for (its context, and for the random one any end at all: Codex asks
for no limit, Claude Code for 32,000 tokens). These weights make each agent turn end after two
decoded tokens whatever the prompt, so the tests measure what they are about: the agent's
requests through the Messages, Responses and chat APIs, a completed turn, and the prompt cache.
The prefill is the real one: the layer runs on every token and fills the KV cache.

How: one layer with one small attention head (SHAPE), whose output projections (attention
`o_proj`, MLP `down_proj`) are zero, so the last hidden state is the last input token's
embedding; an untied `lm_head` scores WORD high only after the generation prompt's last token
(a newline), and the end token on a constant embedding dimension otherwise (so after WORD, the
answer ends)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file
from tokenizers import Tokenizer

WORD = "Hello"
GENERATION_PROMPT_ENDS = ("<|im_start|>assistant\n", "</think>\n\n")
"""How the demo template's generation prompts end (thinking on, thinking off): WORD follows
their last tokens (a newline in the demo tokenizer)."""
CONTEXT = 65536
"""Room for the longest agent prompt (Qwen Code: about 17,400 tokens of this tokenizer)."""
SHAPE = {"num_hidden_layers": 1, "num_attention_heads": 1, "num_key_value_heads": 1, "head_dim": 16}
"""One small layer: the prefill still runs every token through attention and the KV cache,
at a fraction of the demo model's cost (a 17,000-token prompt on a shared 2-core box)."""
END_SCORE = 0.5
"""The end token's score, as a share of WORD's score where an answer starts (other tokens score
about 1/sqrt(hidden) of it, so the end token wins after any other token)."""


def single_token(tokenizer: Tokenizer, text: str) -> int:
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    if len(ids) != 1:
        raise ValueError(f"{text!r} is {len(ids)} tokens in this tokenizer, not one")
    return ids[0]


def one_word_model(demo: Path, dest: Path, context: int = CONTEXT) -> Path:
    """Write the one-word variant of the demo model at `demo` into `dest`; returns `dest`."""
    shutil.copytree(demo, dest)
    config = json.loads((dest / "config.json").read_text())
    tokenizer = Tokenizer.from_file(str(dest / "tokenizer.json"))
    word = single_token(tokenizer, WORD)
    starts = sorted(
        {tokenizer.encode(t, add_special_tokens=False).ids[-1] for t in GENERATION_PROMPT_ENDS}
    )
    eos = config["eos_token_id"]
    end = eos[0] if isinstance(eos, list) else eos

    (weights_file,) = dest.glob("*.safetensors")
    weights = _shrink(load_file(weights_file), SHAPE["head_dim"])
    embed = weights["model.embed_tokens.weight"]
    scale = float(np.sqrt(np.mean(embed[:, 1:] ** 2)))
    embed[:, 0] = scale  # a constant direction: the end token's score
    for name, value in weights.items():
        if name.endswith(("self_attn.o_proj.weight", "mlp.down_proj.weight")):
            value[:] = 0
    weights["model.norm.weight"][:] = 1
    normed = embed / np.sqrt(np.mean(embed**2, axis=1, keepdims=True))
    head = np.zeros_like(embed)
    head[word] = normed[starts].sum(axis=0)
    head[word, 0] = 0
    after_start = min(float(normed[t] @ head[word]) for t in starts)
    head[end, 0] = END_SCORE * after_start / float(np.median(normed[:, 0]))
    weights["lm_head.weight"] = head
    save_file(weights, str(weights_file), metadata={"format": "pt"})

    config.update(SHAPE)
    config.update(tie_word_embeddings=False, max_position_embeddings=context, torch_dtype="float32")
    (dest / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return dest


HEAD_SLICED = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "q_norm.weight", "k_norm.weight")


def _shrink(weights: dict[str, np.ndarray], head_dim: int) -> dict[str, np.ndarray]:
    """The first layer only, with one attention head of `head_dim` (float32)."""
    kept = {}
    for name, value in weights.items():
        if name.startswith("model.layers.") and not name.startswith("model.layers.0."):
            continue
        value = value.astype(np.float32)
        if name.endswith(HEAD_SLICED):
            value = value[:head_dim]
        elif name.endswith("o_proj.weight"):
            value = value[:, :head_dim]
        kept[name] = np.ascontiguousarray(value)
    return kept

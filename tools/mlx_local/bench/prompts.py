"""Prompts of a known length for the benchmark, built with the model's own tokenizer."""

from __future__ import annotations

import json
import secrets
from pathlib import Path

from tokenizers import Tokenizer

from ..models.demo_model import corpus_text

CHARS_PER_TOKEN = 4  # the estimate used when a model has no tokenizer.json


class PromptMaker:
    """Makes system prompts of about N tokens that share nothing with each other."""

    def __init__(self, model: Path) -> None:
        path = model / "tokenizer.json"
        self.tokenizer = Tokenizer.from_file(str(path)) if path.is_file() else None
        self.filler = corpus_text()

    def text(self, tokens: int) -> str:
        """A fresh text of about `tokens` tokens; a random tag up front makes it unique."""
        head = f"Session {secrets.token_hex(4)}. "
        if self.tokenizer is None:
            body = self.filler * (tokens * CHARS_PER_TOKEN // len(self.filler) + 1)
            return head + body[: tokens * CHARS_PER_TOKEN]
        wanted = max(tokens - len(self.tokenizer.encode(head).ids), 1)
        per_copy = len(self.tokenizer.encode(self.filler).ids)
        ids = self.tokenizer.encode(self.filler * (wanted // per_copy + 2)).ids
        return head + self.tokenizer.decode(ids[:wanted])


def end_of_text_ids(model: Path) -> list[int]:
    """Token ids that end a generation (to bias away, so every request decodes its budget)."""
    ids: set[int] = set()
    for name in ("generation_config.json", "config.json"):
        path = model / name
        if not path.is_file():
            continue
        value = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(v for v in value if isinstance(v, int))
    return sorted(ids)

"""What a model in local-models/ may be called."""

from __future__ import annotations

import re

from ..errors import UserError

NAME = re.compile(r"^[A-Za-z0-9][\w.+-]*$")


def check_name(name: str) -> str:
    """`name` when it can name a folder of local-models/, else a UserError saying why."""
    if not NAME.match(name):
        raise UserError(
            f"bad model name {name!r}: use letters, digits, '.', '_', '+' and '-' (no '/')"
        )
    return name

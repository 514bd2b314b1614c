"""AUTOMATIC1111's `<lora:NAME>` / `<lora:NAME:WEIGHT>` prompt tags: found, checked and taken out of the text."""
from __future__ import annotations

import math
import re

from sdrt.errors import InvalidInputError

TAG = re.compile(r"<lora:([^<>]*)>")

LoraTags = tuple[tuple[str, float], ...]  # ((name, weight), ...) sorted by name


def parse_lora_tags(prompt: str) -> tuple[str, LoraTags]:
    """(the prompt without its tags, ((name, weight), ...) sorted by name); weight 1 when not given.
    InvalidInputError for a malformed tag, a weight that is not a finite number, or one name at two weights."""
    tags: dict[str, float] = {}
    for match in TAG.finditer(prompt):
        parts = [p.strip() for p in match.group(1).split(":")]
        if not parts[0] or len(parts) > 2:
            raise InvalidInputError(f"prompt tag {match.group(0)!r}: use <lora:NAME> or <lora:NAME:WEIGHT>")
        try:
            weight = float(parts[1]) if len(parts) == 2 else 1.0
        except ValueError:
            weight = math.nan
        if not math.isfinite(weight):
            raise InvalidInputError(f"prompt tag {match.group(0)!r}: the weight must be a finite number")
        if tags.get(parts[0], weight) != weight:
            raise InvalidInputError(f"prompt tag {match.group(0)!r}: {parts[0]!r} is tagged twice with different weights")
        tags[parts[0]] = weight
    return TAG.sub("", prompt), tuple(sorted(tags.items()))


def has_lora_tags(text: str) -> bool:
    return TAG.search(text) is not None

"""AUTOMATIC1111's prompt syntax: emphasis weights and `BREAK`.

    (text)        x1.1        ((text)) x1.21, nesting multiplies
    (text:1.5)    x1.5        a number after the last ':' before ')'
    [text]        /1.1
    \\( \\) \\[ \\]   literal brackets;  \\\\  a literal backslash
    BREAK         (upper case, a word of its own) ends the current 75-token chunk

The rules are A1111's `parse_prompt_attention` (modules/prompt_parser.py), so a prompt means what it means
there: a ')' or ']' with nothing open is literal text; a '(' or '[' never closed weights the rest of the
prompt and is itself dropped; nothing here raises. One addition: a weight that is not a number
("(a:1.2.3)") leaves the ':...' as literal text instead of raising.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Union

ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1

_ATTENTION = re.compile(r"""
\\\(|\\\)|\\\[|\\]|\\\\|\\|   # escapes, and a lone backslash
\(|\[|
:\s*([+-]?[.\d]+)\s*\)|       # ':1.5)' closes a '(' with an explicit weight
\)|]|
[^\\()\[\]:]+|
:
""", re.X)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


class Break:
    """The `BREAK` keyword: start a new chunk."""

    def __repr__(self) -> str:
        return "BREAK"


BREAK = Break()


@dataclass
class Fragment:
    text: str
    weight: float


def parse_prompt(text: str) -> list[Union[Fragment, Break]]:
    """A prompt -> its text fragments with their weights, and BREAKs; runs of one weight are merged.
    An empty prompt is one empty fragment of weight 1."""
    parts: list[Union[Fragment, Break]] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply_from(start: int, factor: float) -> None:
        for part in parts[start:]:
            if isinstance(part, Fragment):
                part.weight *= factor

    for match in _ATTENTION.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            parts.append(Fragment(token[1:], 1.0))
        elif token == "(":
            round_open.append(len(parts))
        elif token == "[":
            square_open.append(len(parts))
        elif weight is not None and round_open and _is_number(weight):
            multiply_from(round_open.pop(), float(weight))
        elif weight is not None and round_open:  # "(a:1.2.3)": the ':1.2.3' is text, the ')' closes
            parts.append(Fragment(token[:-1], 1.0))
            multiply_from(round_open.pop(), ROUND_MULTIPLIER)
        elif token == ")" and round_open:
            multiply_from(round_open.pop(), ROUND_MULTIPLIER)
        elif token == "]" and square_open:
            multiply_from(square_open.pop(), SQUARE_MULTIPLIER)
        else:
            for i, piece in enumerate(_BREAK.split(token)):
                if i:
                    parts.append(BREAK)
                parts.append(Fragment(piece, 1.0))
    for start in round_open:
        multiply_from(start, ROUND_MULTIPLIER)
    for start in square_open:
        multiply_from(start, SQUARE_MULTIPLIER)
    return _merge(parts) or [Fragment("", 1.0)]


def plain_prompt(text: str) -> list[Union[Fragment, Break]]:
    """Emphasis off: brackets are text; only BREAK is read."""
    parts: list[Union[Fragment, Break]] = []
    for i, piece in enumerate(_BREAK.split(text)):
        if i:
            parts.append(BREAK)
        parts.append(Fragment(piece, 1.0))
    return parts


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _merge(parts: list[Union[Fragment, Break]]) -> list[Union[Fragment, Break]]:
    merged: list[Union[Fragment, Break]] = []
    for part in parts:
        last = merged[-1] if merged else None
        if isinstance(part, Fragment) and isinstance(last, Fragment) and last.weight == part.weight:
            last.text += part.text
        else:
            merged.append(part)
    return merged

"""AUTOMATIC1111's emphasis syntax (sdrt.prompt_parser): weights, nesting, escapes, BREAK, malformed input."""
from __future__ import annotations

import pytest

from sdrt.prompt_parser import BREAK, Fragment, parse_prompt, plain_prompt


def _pairs(text):
    return [p if p is BREAK else (p.text, round(p.weight, 6)) for p in parse_prompt(text)]


@pytest.mark.parametrize("text, expected", [
    ("a cat", [("a cat", 1.0)]),
    ("", [("", 1.0)]),
    ("a (cat)", [("a ", 1.0), ("cat", 1.1)]),
    ("((cat))", [("cat", 1.21)]),
    ("(((cat)))", [("cat", 1.331)]),
    ("[cat]", [("cat", round(1 / 1.1, 6))]),
    ("[[cat]]", [("cat", round(1 / 1.21, 6))]),
    ("(cat:1.5) dog", [("cat", 1.5), (" dog", 1.0)]),
    ("( cat : 0.25 )", [(" cat ", 0.25)]),
    ("(cat:-1)", [("cat", -1.0)]),
    ("((a) b:0.5)", [("a", 0.55), (" b", 0.5)]),            # nesting multiplies
    ("([a] (b))", [("a", 1.0), (" ", 1.1), ("b", 1.21)]),      # [x] inside (x): 1.1/1.1
    ("(a (b:2) c)", [("a ", 1.1), ("b", 2.2), (" c", 1.1)]),
    (r"\(literal\) \[x\]", [("(literal) [x]", 1.0)]),
    (r"a \\ b", [("a \\ b", 1.0)]),
    (r"(a \) b)", [("a ) b", 1.1)]),
])
def test_weights(text, expected):
    assert _pairs(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("a ) b", [("a ) b", 1.0)]),                   # a ')' with nothing open is text
    ("a ] b", [("a ] b", 1.0)]),
    ("a ( b", [("a ", 1.0), (" b", 1.1)]),         # an unclosed '(' weights the rest, as in A1111
    ("a [ b", [("a ", 1.0), (" b", round(1 / 1.1, 6))]),
    ("(a]", [("a]", 1.1)]),                        # ']' with no '[' open is text
    ("a:1.5)", [("a:1.5)", 1.0)]),                 # a weight with no '(' is text
    ("(a:1.2.3)", [("a:1.2.3", 1.1)]),             # not a number: text, and ')' closes as plain
    ("(a:b)", [("a:b", 1.1)]),
    ("((((", [("", 1.0)]),
    ("))))", [("))))", 1.0)]),
    ("\\", [("", 1.0)]),
    ("(:1.5)", [("", 1.0)]),
])
def test_malformed_is_text_never_an_error(text, expected):
    assert _pairs(text) == expected


def test_break():
    assert _pairs("a BREAK b") == [("a", 1.0), BREAK, ("b", 1.0)]
    assert _pairs("(a BREAK b)") == [("a", 1.1), BREAK, ("b", 1.1)]
    assert _pairs("BREAKFAST break a") == [("BREAKFAST break a", 1.0)]  # a whole upper-case word only
    assert _pairs("aBREAK") == [("aBREAK", 1.0)]


def test_plain_prompt_reads_only_break():
    assert plain_prompt("(a:1.5) BREAK [b]") == [Fragment("(a:1.5)", 1.0), BREAK, Fragment("[b]", 1.0)]

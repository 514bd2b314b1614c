"""CLIP's BPE vocabulary, shipped with sdrt, so single-file checkpoints need no tokenizer folder.

`sdrt/assets/clip_bpe_merges.txt.gz` (208 KB) holds the first 48,895 lines of `bpe_simple_vocab_16e6.txt.gz`
as OpenAI's CLIP and OpenCLIP ship it (the same file in the open_clip_torch 3.3.0 and clip-anytorch 2.6.0
wheels on PyPI, sha256 924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a): a header line, then
the 48,894 merges CLIP uses. The later 213k lines, which neither reads, are left out; recompressed with
`zcat bpe_simple_vocab_16e6.txt.gz | head -n 48895 | gzip -9n`. The data is under the MIT licenses of OpenCLIP
(Copyright (c) 2012-2021 Gabriel Ilharco, Mitchell Wortsman, et al.) and OpenAI's CLIP (Copyright (c) 2021
OpenAI), reproduced in `sdrt/assets/clip_bpe_merges.LICENSE.txt`.

The 49,408-token vocabulary is derived from the merges as OpenAI's `SimpleTokenizer` derives it: the 256
byte characters, the same with "</w>", each merge's result in merge order, then <|startoftext|> and
<|endoftext|>. SD 1.x (CLIP ViT-L/14) and SD 2.x (OpenCLIP ViT-H/14) use this same vocabulary; they differ
only in the pad token.
"""
from __future__ import annotations

import functools
import gzip
from pathlib import Path

MERGES_FILE = Path(__file__).resolve().parent / "assets" / "clip_bpe_merges.txt.gz"
# CLIP's vocabulary size, fixed by its token embedding: 256 bytes x 2 (with and without "</w>"), the
# merges, and the two special tokens.
VOCAB_SIZE = 49408
NUM_MERGES = VOCAB_SIZE - 2 * 256 - 2


def byte_alphabet() -> list[str]:
    """The 256 characters byte-level BPE spells words in (GPT-2's reversible byte -> character table), in
    OpenAI's order: the printable bytes as themselves, then the others as chr(256), chr(257), ..."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


@functools.lru_cache(maxsize=1)
def bundled_vocabulary() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab: token -> id, merges in rank order). Parsed once per process; callers must not modify them."""
    with gzip.open(MERGES_FILE, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(line.split(" ")) for line in lines[1:NUM_MERGES + 1]]
    alphabet = byte_alphabet()
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(tokens)}, merges

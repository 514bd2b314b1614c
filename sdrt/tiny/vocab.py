"""A CLIP-format BPE vocabulary (vocab.json + merges.txt) built from a list of words.

CLIP's BPE starts from the 256 byte symbols and their end-of-word variants ("a</w>"); each word of
our captions gets the merges that rebuild it left to right, so it encodes as one token, while any
other text still encodes, byte by byte.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable


def _bytes_to_unicode() -> list[str]:
    """CLIP/GPT-2's printable stand-ins for the 256 byte values, in CLIP's vocabulary order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def build_vocab(words: Iterable[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    symbols = _bytes_to_unicode()
    tokens = symbols + [s + "</w>" for s in symbols]
    merges: list[tuple[str, str]] = []
    for word in sorted(set(words)):
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            pair = (parts[0], parts[1])
            merged = parts[0] + parts[1]
            if pair not in merges:
                merges.append(pair)
                tokens.append(merged)
            parts = [merged] + parts[2:]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def write_tokenizer(folder: Path, words: Iterable[str]) -> int:
    """Write vocab.json, merges.txt and the tokenizer configs; returns the vocabulary size."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab(words)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": "<|endoftext|>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {**special, "model_max_length": 77, "tokenizer_class": "CLIPTokenizer", "do_lower_case": True}, indent=2))
    return len(vocab)

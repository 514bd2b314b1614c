"""CLIP's byte-level BPE tokenizer, on the `tokenizers` library.

The pipeline is the one transformers' `CLIPTokenizer` builds from `vocab.json` + `merges.txt`
(the same one its `tokenizer.json` files hold): NFC, whitespace runs to one space, lowercase; CLIP's
regex split; byte-level alphabet; BPE with "</w>" marking word ends; <|startoftext|> ... <|endoftext|>
around each prompt. Padding and truncation to `model_max_length` are done here, so truncation can
report what it dropped.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Union

import torch
from tokenizers import AddedToken, Regex, Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from sdrt.config import read_json
from sdrt.errors import InvalidInputError, ModelLoadError

logger = logging.getLogger(__name__)

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
# CLIP's word split (openai/CLIP simple_tokenizer.py), special tokens first so they stay whole.
_CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def _read_vocab(path: Path) -> dict[str, int]:
    try:
        with open(path, encoding="utf-8") as f:
            vocab = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{path}: not a readable tokenizer vocabulary ({e})") from None
    if not isinstance(vocab, dict) or not all(isinstance(i, int) for i in vocab.values()):
        raise ModelLoadError(f"{path}: expected a JSON object mapping tokens to integer ids")
    return vocab


def _read_merges(path: Path) -> list[tuple[str, str]]:
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path}: not a readable BPE merges file ({e})") from None
    if lines and lines[0].startswith("#version"):
        lines = lines[1:]
    merges = []
    for number, line in enumerate(lines, start=2):
        if not line:
            continue
        pair = line.split(" ")
        if len(pair) != 2:
            raise ModelLoadError(f"{path}: line {number} is not a BPE merge 'a b': {line!r}")
        merges.append((pair[0], pair[1]))
    return merges


def _token_content(value: Any) -> Any:
    """tokenizer_config.json stores a token either as a string or as a serialized AddedToken."""
    return value.get("content") if isinstance(value, dict) else value


class CLIPTokenizer:
    """Prompts -> input ids [B, model_max_length], padded and truncated like transformers'
    `tokenizer(prompts, padding="max_length", truncation=True, max_length=model_max_length)`."""

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], *,
                 pad_token: str = EOS_TOKEN, model_max_length: int = 77, source: str = "tokenizer"):
        for name, token in (("bos_token", BOS_TOKEN), ("eos_token", EOS_TOKEN), ("pad_token", pad_token)):
            if token not in vocab:
                raise ModelLoadError(f"{source}: {name} {token!r} is not in the vocabulary")
        if model_max_length < 2:
            raise ModelLoadError(f"{source}: model_max_length={model_max_length} leaves no room for BOS and EOS")
        self.model_max_length = model_max_length
        self.pad_token = pad_token
        self.bos_token_id = vocab[BOS_TOKEN]
        self.eos_token_id = vocab[EOS_TOKEN]
        self.pad_token_id = vocab[pad_token]
        self.vocab_size = len(vocab)

        tok = Tokenizer(BPE(vocab=vocab, merges=merges, continuing_subword_prefix="",
                            end_of_word_suffix="</w>", fuse_unk=False, unk_token=EOS_TOKEN))
        tok.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ])
        # Special tokens written in a prompt map to their ids, matched before normalization
        # (so "<|ENDOFTEXT|>" is ordinary text), as in transformers.
        tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in (BOS_TOKEN, EOS_TOKEN)])
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS_TOKEN} $A {EOS_TOKEN}",
            special_tokens=[(BOS_TOKEN, self.bos_token_id), (EOS_TOKEN, self.eos_token_id)])
        self._tokenizer = tok

    @classmethod
    def from_files(cls, vocab_file: Union[str, Path], merges_file: Union[str, Path], *,
                   pad_token: str = EOS_TOKEN, model_max_length: int = 77) -> "CLIPTokenizer":
        vocab_file, merges_file = Path(vocab_file), Path(merges_file)
        for path in (vocab_file, merges_file):
            if not path.is_file():
                raise ModelLoadError(f"missing tokenizer file: {path}")
        return cls(_read_vocab(vocab_file), _read_merges(merges_file), pad_token=pad_token,
                   model_max_length=model_max_length, source=str(vocab_file.parent))

    @classmethod
    def from_folder(cls, path: Union[str, Path]) -> "CLIPTokenizer":
        """A diffusers `tokenizer/` folder: vocab.json, merges.txt and optionally tokenizer_config.json
        and special_tokens_map.json (SD 1.x pads with <|endoftext|>, SD 2.x with "!")."""
        path = Path(path)
        settings: dict[str, Any] = {}
        # special_tokens_map.json overrides tokenizer_config.json, as in transformers.
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            if (path / name).is_file():
                settings.update(read_json(path / name))
        pad_token = _token_content(settings.get("pad_token", EOS_TOKEN))
        max_length = settings.get("model_max_length", 77)
        if not isinstance(pad_token, str):
            raise ModelLoadError(f"{path}: pad_token must be a string, got {pad_token!r}")
        if not isinstance(max_length, int) or isinstance(max_length, bool):
            raise ModelLoadError(f"{path}: model_max_length must be an integer, got {max_length!r}")
        return cls.from_files(path / "vocab.json", path / "merges.txt", pad_token=pad_token,
                              model_max_length=max_length)

    def __call__(self, prompts: Union[str, list[str]]) -> torch.Tensor:
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
            raise InvalidInputError("prompts must be a str or a list of str")
        n = self.model_max_length
        ids = torch.full((len(prompts), n), self.pad_token_id, dtype=torch.long)
        for row, encoding in enumerate(self._tokenizer.encode_batch(list(prompts))):
            tokens = encoding.ids
            if len(tokens) > n:
                logger.warning("prompt %d is %d tokens long with BOS/EOS; the text encoder takes %d, "
                               "so its last %d tokens are dropped", row, len(tokens), n, len(tokens) - n)
                tokens = tokens[:n - 1] + [self.eos_token_id]
            ids[row, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        return ids


"""CLIP's byte-level BPE tokenizer, on the `tokenizers` library.

The pipeline is the one transformers' `CLIPTokenizer` builds from `vocab.json` + `merges.txt`
(the same one its `tokenizer.json` files hold): NFC, whitespace runs to one space, lowercase; CLIP's
regex split; byte-level alphabet; BPE with "</w>" marking word ends; <|startoftext|> ... <|endoftext|>
around each prompt. Padding and truncation to `model_max_length` are done here, so truncation can
report what it dropped.
"""
from __future__ import annotations

import copy
import functools
import json
import logging
from pathlib import Path
from typing import Any, Union

import torch
from tokenizers import AddedToken, Regex, Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from sdrt.clip_vocab import bundled_vocabulary
from sdrt.config import read_json
from sdrt.errors import InvalidInputError, ModelLoadError

logger = logging.getLogger(__name__)

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
# transformers writes int(1e30) as model_max_length when a tokenizer was saved without a limit;
# CLIP's text encoder takes 77 positions.
_NO_LIMIT = 10**20
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
    first = 2 if lines and lines[0].startswith("#version") else 1
    merges = []
    for number, line in enumerate(lines[first - 1:], start=first):
        if not line:
            continue
        pair = line.split(" ")
        if len(pair) != 2:
            raise ModelLoadError(f"{path}: line {number} is not a BPE merge 'a b': {line!r}")
        merges.append((pair[0], pair[1]))
    return merges


def _read_tokenizer_json(path: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    model = read_json(path).get("model") or {}
    vocab, merges = model.get("vocab"), model.get("merges")
    if model.get("type") != "BPE" or not isinstance(vocab, dict) or not isinstance(merges, list):
        raise ModelLoadError(f"{path}: expected a BPE model with vocab and merges")
    pairs = []
    for number, merge in enumerate(merges):
        pair = merge.split(" ") if isinstance(merge, str) else merge
        if not isinstance(pair, list) or len(pair) != 2:
            raise ModelLoadError(f"{path}: merge {number} is not a pair: {merge!r}")
        pairs.append((pair[0], pair[1]))
    return vocab, pairs


def _special_token(value: Any, default: str) -> tuple[str, bool]:
    """(content, normalized) of a special-token entry in tokenizer_config.json/special_tokens_map.json:
    a plain string (matched on the raw prompt) or a serialized AddedToken with its `normalized` flag."""
    if value is None:
        return default, False
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"], bool(value.get("normalized", False))
    if isinstance(value, str):
        return value, False
    raise ModelLoadError(f"expected a token string or {{'content': ...}} object, got {value!r}")


class CLIPTokenizer:
    """Prompts -> input ids [B, model_max_length], padded and truncated like transformers'
    `tokenizer(prompts, padding="max_length", truncation=True, max_length=model_max_length)`.

    `normalized_tokens`: special tokens matched after normalization, i.e. also when written in upper
    case ("<|ENDOFTEXT|>"); the others are matched only verbatim. `from_folder` takes this from the
    `normalized` flags in the folder's tokenizer configs, as transformers does.
    """

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], *,
                 bos_token: str = BOS_TOKEN, eos_token: str = EOS_TOKEN, unk_token: str = EOS_TOKEN,
                 pad_token: str = EOS_TOKEN, normalized_tokens: frozenset = frozenset(),
                 model_max_length: int = 77, source: str = "tokenizer"):
        specials = {"bos_token": bos_token, "eos_token": eos_token, "unk_token": unk_token, "pad_token": pad_token}
        for name, token in specials.items():
            if token not in vocab:
                raise ModelLoadError(f"{source}: {name} {token!r} is not in the vocabulary")
        if model_max_length < 2:
            raise ModelLoadError(f"{source}: model_max_length={model_max_length} leaves no room for BOS and EOS")
        self.model_max_length = model_max_length
        self.pad_token = pad_token
        self.bos_token_id = vocab[bos_token]
        self.eos_token_id = vocab[eos_token]
        self.pad_token_id = vocab[pad_token]
        self.vocab_size = len(vocab)

        tok = Tokenizer(BPE(vocab=vocab, merges=merges, continuing_subword_prefix="",
                            end_of_word_suffix="</w>", fuse_unk=False, unk_token=unk_token))
        tok.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ])
        # Special tokens written in a prompt map straight to their ids, as in transformers; so with a
        # pad token like SD 2.x's "!", every "!" in a prompt becomes id 0 rather than part of a BPE word.
        tok.add_special_tokens([AddedToken(t, normalized=t in normalized_tokens, special=True)
                                for t in dict.fromkeys(specials.values())])
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos_token} $A {eos_token}",
            special_tokens=[(bos_token, self.bos_token_id), (eos_token, self.eos_token_id)])
        self._tokenizer = tok

    @classmethod
    def bundled(cls, pad_token: str = EOS_TOKEN) -> "CLIPTokenizer":
        """CLIP's vocabulary shipped with sdrt (`sdrt.clip_vocab`), set up as SD releases' tokenizer folders are:
        pad_token "<|endoftext|>" for SD 1.x (CLIP ViT-L/14), "!" for SD 2.x (OpenCLIP ViT-H/14). The ids are
        transformers' on those folders. Built once per pad token and process (about 0.15 s), then copied."""
        if not isinstance(pad_token, str) or pad_token not in bundled_vocabulary()[0]:
            raise InvalidInputError(f"pad_token must be a token of CLIP's vocabulary, such as {EOS_TOKEN!r} (SD 1.x) "
                                    f"or '!' (SD 2.x), got {pad_token!r}")
        # A copy, so callers may change its attributes; the `tokenizers` pipeline inside is shared and never changed.
        return copy.copy(_bundled_tokenizer(pad_token))

    @classmethod
    def from_files(cls, vocab_file: Union[str, Path], merges_file: Union[str, Path],
                   **kwargs: Any) -> "CLIPTokenizer":
        """vocab.json + merges.txt; keyword arguments as for the constructor."""
        vocab_file, merges_file = Path(vocab_file), Path(merges_file)
        for path in (vocab_file, merges_file):
            if not path.is_file():
                raise ModelLoadError(f"missing tokenizer file: {path}")
        kwargs.setdefault("source", str(vocab_file.parent))
        return cls(_read_vocab(vocab_file), _read_merges(merges_file), **kwargs)

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
        tokens, normalized = {}, {}
        # transformers registers the special tokens in this order; when two share a content
        # (SD 1.x: eos and pad), the later entry's `normalized` flag wins.
        for name, default in (("bos_token", BOS_TOKEN), ("eos_token", EOS_TOKEN),
                              ("unk_token", EOS_TOKEN), ("pad_token", EOS_TOKEN)):
            try:
                tokens[name], flag = _special_token(settings.get(name), default)
            except ModelLoadError as e:
                raise ModelLoadError(f"{path}: {name}: {e}") from None
            normalized[tokens[name]] = flag
        max_length = settings.get("model_max_length", 77)
        if not isinstance(max_length, int) or isinstance(max_length, bool):
            raise ModelLoadError(f"{path}: model_max_length must be an integer, got {max_length!r}")
        if max_length >= _NO_LIMIT:
            max_length = 77
        options = dict(tokens, normalized_tokens=frozenset(t for t, flag in normalized.items() if flag),
                       model_max_length=max_length, source=str(path))
        if not (path / "vocab.json").is_file() and (path / "tokenizer.json").is_file():
            # transformers >= 5 saves only tokenizer.json, whose BPE model holds the same vocab and merges
            return cls(*_read_tokenizer_json(path / "tokenizer.json"), **options)
        return cls.from_files(path / "vocab.json", path / "merges.txt", **options)

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        """Each text's token ids without BOS/EOS, padding or truncation (for chunking long prompts)."""
        return [e.ids for e in self._tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def __call__(self, prompts: Union[str, list[str]]) -> torch.Tensor:
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
            raise InvalidInputError(f"prompts must be a str or a list of str, got {type(prompts).__name__}")
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


@functools.lru_cache(maxsize=4)
def _bundled_tokenizer(pad_token: str) -> CLIPTokenizer:
    # SD releases' tokenizer configs declare BOS, EOS and UNK as AddedTokens with normalized=true and the pad
    # token as a plain string; registered in that order, the pad entry's flag wins when it is EOS (SD 1.x).
    normalized = frozenset({BOS_TOKEN, EOS_TOKEN} - {pad_token})
    return CLIPTokenizer(*bundled_vocabulary(), pad_token=pad_token, normalized_tokens=normalized,
                         source="sdrt's bundled CLIP vocabulary")

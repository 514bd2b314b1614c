"""Textual-inversion embeddings: the files people have -> new rows of the text encoder's token table.

Formats (what is in the file decides, not its name):
- AUTOMATIC1111 `.pt` / `.bin`: a pickle {"string_to_param": {"*": [n, D]}, "name": ..., ...}
- a single tensor under one key: diffusers' `learned_embeds.bin` / `.safetensors` ({token: [D] or [n, D]}),
  kohya's and A1111's `.safetensors` ({"emb_params": [n, D]})
Pickles are read with `torch.load(weights_only=True)` only: tensors, dicts, lists, numbers and strings.

The token a prompt uses: `token=` if given; else a diffusers file's key; else (A1111, kohya) the file's stem,
as A1111 names embeddings. An n-vector embedding gets n new ids, written into a prompt as one group that a
75-token chunk never splits (`sdrt.prompt_encoding`); diffusers writes the same ids as
"token token_1 ... token_{n-1}". Tokens are found in the prompt text as written (case-sensitive, anywhere,
longest first), before tokenization.
"""
from __future__ import annotations

import logging
import pickle
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from sdrt.errors import InvalidInputError, ModelLoadError
from sdrt.models.clip import CLIPTextModel
from sdrt.prompt_encoding import CHUNK_TOKENS

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".pt", ".bin", ".ckpt", ".pth")
_GENERIC_KEYS = ("emb_params", "*")  # single-key files whose key is not a token anyone types


def read_embedding(path: Union[str, Path]) -> tuple[Optional[str], torch.Tensor]:
    """(the token the file names or None, vectors [n, D] float32) of an embedding file."""
    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(f"textual inversion {str(path)!r}: no such file")
    data = _load(path)
    if isinstance(data, dict) and isinstance(data.get("string_to_param"), dict):  # A1111
        params = data["string_to_param"]
        if len(params) != 1:
            raise InvalidInputError(f"{path}: string_to_param holds {len(params)} embeddings, expected one")
        token, vectors = None, next(iter(params.values()))
    elif isinstance(data, dict) and {"clip_l", "clip_g"} <= set(data):
        raise InvalidInputError(f"{path}: an SDXL embedding (clip_l + clip_g); this model has one text encoder")
    elif isinstance(data, dict) and len(data) == 1:  # diffusers, kohya
        key, vectors = next(iter(data.items()))
        token = None if key in _GENERIC_KEYS else str(key)
    else:
        keys = list(data)[:8] if isinstance(data, dict) else type(data).__name__
        raise InvalidInputError(f"{path}: not a textual-inversion embedding (expected string_to_param or one "
                                f"tensor under one key, got {keys})")
    if not torch.is_tensor(vectors) or vectors.dim() not in (1, 2) or not vectors.is_floating_point() \
            or 0 in vectors.shape:
        got = list(vectors.shape) if torch.is_tensor(vectors) else type(vectors).__name__
        raise InvalidInputError(f"{path}: the embedding must be a float tensor [D] or [n, D], got {got}")
    vectors = vectors.detach().float().reshape(-1, vectors.shape[-1])
    if not torch.isfinite(vectors).all():
        raise InvalidInputError(f"{path}: the embedding holds NaN or inf")
    return token, vectors


def _load(path: Path):
    if path.suffix.lower() == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError) as e:
            raise ModelLoadError(f"{path}: not a readable .safetensors file ({e})") from None
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InvalidInputError(f"{path}: holds more than tensors, dicts and strings, which sdrt does not unpickle "
                                f"(torch.load weights_only=True: {first})") from None
    except (RuntimeError, OSError, EOFError) as e:
        raise ModelLoadError(f"{path}: not a readable PyTorch file ({e})") from None


def add_embedding(text_encoder: CLIPTextModel, vectors: torch.Tensor) -> list[int]:
    """Append `vectors` [n, D] to the token table; returns their new ids."""
    table: nn.Embedding = text_encoder.text_model.embeddings.token_embedding
    old = table.weight
    first = old.shape[0]
    table.weight = nn.Parameter(torch.cat([old.detach(), vectors.to(old.device, old.dtype)]),
                                requires_grad=old.requires_grad)
    table.num_embeddings = table.weight.shape[0]
    return list(range(first, first + vectors.shape[0]))


def load_textual_inversion(text_encoder, tokens: dict[str, list[int]], path: Union[str, Path],
                           token: Optional[str] = None, backend: str = "torch") -> str:
    """Read `path`, add its vectors to `text_encoder` and `tokens` ({token: ids}); returns the token."""
    if token is not None and (not isinstance(token, str) or not token.strip() or token != token.strip()):
        raise InvalidInputError(f"token must be None or a non-empty string without surrounding spaces, got {token!r}")
    if not isinstance(text_encoder, CLIPTextModel):
        raise InvalidInputError(f"load_textual_inversion needs the torch backend (the {backend} backend's text "
                                f"encoder was exported with its token table)")
    path = Path(path)
    named, vectors = read_embedding(path)
    token = token or named or path.stem
    width = text_encoder.config.hidden_size
    if vectors.shape[1] != width:
        raise InvalidInputError(f"{path}: the embedding is {vectors.shape[1]} wide but this model's text encoder "
                                f"takes {width} (an embedding made for another model family?)")
    if vectors.shape[0] > CHUNK_TOKENS:
        raise InvalidInputError(f"{path}: {vectors.shape[0]} vectors; a 75-token chunk holds at most {CHUNK_TOKENS}")
    if token in tokens:
        raise InvalidInputError(f"textual inversion token {token!r} is already loaded; pass token= to name this one")
    tokens[token] = add_embedding(text_encoder, vectors)
    log.info("textual inversion %s: token %r, %d vector(s)", path, token, vectors.shape[0])
    return token

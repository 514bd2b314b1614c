"""Textual-inversion embeddings: the files people have -> new rows of the text encoder's token table.

Formats (what is in the file decides, not its name):
- AUTOMATIC1111 `.pt` / `.bin`: a pickle {"string_to_param": {"*": [n, D]}, "name": ..., ...}
- a single tensor under one key: diffusers' `learned_embeds.bin` / `.safetensors` ({token: [D] or [n, D]}),
  kohya's and A1111's `.safetensors` ({"emb_params": [n, D]})
- SDXL (A1111, kohya): {"clip_l": [n, 768], "clip_g": [n, 1280]}, the vectors of each text encoder; the token is
  the file's stem
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


SDXL_KEYS = ("clip_l", "clip_g")  # SDXL embeddings: vectors for the first (CLIP ViT-L) and second (bigG) encoder


def read_embedding(path: Union[str, Path]) -> tuple[Optional[str], torch.Tensor]:
    """(the token the file names or None, vectors [n, D] float32) of a one-encoder embedding file."""
    token, vectors = read_embedding_file(path)
    if set(vectors) != {""}:
        raise InvalidInputError(f"{path}: an SDXL embedding (clip_l + clip_g); this model has one text encoder")
    return token, vectors[""]


def read_sdxl_embedding(path: Union[str, Path]) -> dict[str, torch.Tensor]:
    """{"clip_l": [n, D1], "clip_g": [n, D2]} float32 of an SDXL embedding file (one n for both)."""
    _, vectors = read_embedding_file(path)
    if set(vectors) != set(SDXL_KEYS):
        raise InvalidInputError(f"{path}: an embedding for a one-encoder model (SD 1.x/2.x); SDXL embeddings hold "
                                f"clip_l and clip_g vectors")
    if vectors["clip_l"].shape[0] != vectors["clip_g"].shape[0]:
        raise InvalidInputError(f"{path}: clip_l holds {vectors['clip_l'].shape[0]} vectors but clip_g "
                                f"{vectors['clip_g'].shape[0]}; they must be as many")
    return vectors


def read_embedding_file(path: Union[str, Path]) -> tuple[Optional[str], dict[str, torch.Tensor]]:
    """(the token the file names or None, {"": [n, D]} or SDXL's {"clip_l": ..., "clip_g": ...}, float32)."""
    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(f"textual inversion {str(path)!r}: no such file")
    data = _load(path)
    if isinstance(data, dict) and isinstance(data.get("string_to_param"), dict):  # A1111
        params = data["string_to_param"]
        if len(params) != 1:
            raise InvalidInputError(f"{path}: string_to_param holds {len(params)} embeddings, expected one")
        token, vectors = None, {"": next(iter(params.values()))}
    elif isinstance(data, dict) and set(SDXL_KEYS) <= set(data):
        token, vectors = None, {key: data[key] for key in SDXL_KEYS}
    elif isinstance(data, dict) and len(data) == 1:  # diffusers, kohya
        key, tensor = next(iter(data.items()))
        token, vectors = None if key in _GENERIC_KEYS else str(key), {"": tensor}
    else:
        keys = list(data)[:8] if isinstance(data, dict) else type(data).__name__
        raise InvalidInputError(f"{path}: not a textual-inversion embedding (expected string_to_param, clip_l + "
                                f"clip_g, or one tensor under one key, got {keys})")
    return token, {key: _checked_vectors(path, key, tensor) for key, tensor in vectors.items()}


def _checked_vectors(path: Path, key: str, vectors) -> torch.Tensor:
    where = f"{path}{f' {key}' if key else ''}"
    if not torch.is_tensor(vectors) or vectors.dim() not in (1, 2) or not vectors.is_floating_point() \
            or 0 in vectors.shape:
        got = list(vectors.shape) if torch.is_tensor(vectors) else type(vectors).__name__
        raise InvalidInputError(f"{where}: the embedding must be a float tensor [D] or [n, D], got {got}")
    vectors = vectors.detach().float().reshape(-1, vectors.shape[-1])
    if not torch.isfinite(vectors).all():
        raise InvalidInputError(f"{where}: the embedding holds NaN or inf")
    if vectors.shape[0] > CHUNK_TOKENS:
        raise InvalidInputError(f"{where}: {vectors.shape[0]} vectors; a 75-token chunk holds at most {CHUNK_TOKENS}")
    return vectors


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
    _check_token(token)
    _check_torch(text_encoder, backend)
    path = Path(path)
    named, vectors = read_embedding(path)
    token = token or named or path.stem
    _check_new(token, tokens)
    _check_width(path, "", vectors, text_encoder)
    tokens[token] = add_embedding(text_encoder, vectors)
    log.info("textual inversion %s: token %r, %d vector(s)", path, token, vectors.shape[0])
    return token


def load_sdxl_textual_inversion(encoders: list[tuple[str, object, dict[str, list[int]]]], path: Union[str, Path],
                                token: Optional[str] = None, backend: str = "torch") -> str:
    """An SDXL embedding file into each (key, text encoder, tokens) of `encoders` ("clip_l" for the first
    encoder, "clip_g" for the second; a refiner has only the second); returns the token (default: the stem)."""
    _check_token(token)
    for _, text_encoder, _ in encoders:
        _check_torch(text_encoder, backend)
    path = Path(path)
    vectors = read_sdxl_embedding(path)
    token = token or path.stem
    for key, text_encoder, tokens in encoders:
        _check_new(token, tokens)
        _check_width(path, key, vectors[key], text_encoder)
    for key, text_encoder, tokens in encoders:
        tokens[token] = add_embedding(text_encoder, vectors[key])
    log.info("textual inversion %s: token %r, %d vector(s) per encoder", path, token, vectors["clip_g"].shape[0])
    return token


def _check_token(token) -> None:
    if token is not None and (not isinstance(token, str) or not token.strip() or token != token.strip()):
        raise InvalidInputError(f"token must be None or a non-empty string without surrounding spaces, got {token!r}")


def _check_torch(text_encoder, backend: str) -> None:
    if not isinstance(text_encoder, CLIPTextModel):
        raise InvalidInputError(f"load_textual_inversion needs the torch backend (the {backend} backend's text "
                                f"encoder was exported with its token table)")


def _check_new(token: str, tokens: dict) -> None:
    if token in tokens:
        raise InvalidInputError(f"textual inversion token {token!r} is already loaded; pass token= to name this one")


def _check_width(path: Path, key: str, vectors: torch.Tensor, text_encoder: CLIPTextModel) -> None:
    width = text_encoder.config.hidden_size
    if vectors.shape[1] != width:
        raise InvalidInputError(f"{path}{f' {key}' if key else ''}: the embedding is {vectors.shape[1]} wide but "
                                f"this model's text encoder{f' for {key}' if key else ''} takes {width} (an embedding "
                                f"made for another model family?)")

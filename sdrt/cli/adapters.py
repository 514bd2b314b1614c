"""`sdrt generate`'s adapter arguments: `--lora PATH[:SCALE]`, `--lora-dir DIR` (for `<lora:NAME:W>` prompt tags)
and `--embedding PATH[:TOKEN]`, each repeatable; and what the PNG parameters record of them.

Paths and scales are checked when the arguments are parsed (before torch is imported); a file's contents when
the pipeline loads it. `PATH:SUFFIX` is split at the last colon only when PATH:SUFFIX itself is not a file."""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from sdrt.errors import InvalidInputError


@dataclass(frozen=True)
class LoraArg:
    path: Path
    scale: float


@dataclass(frozen=True)
class EmbeddingArg:
    path: Path
    token: Optional[str]


def _split(text: str, option: str) -> tuple[Path, Optional[str]]:
    path = Path(text).expanduser()
    if path.is_file() or ":" not in text:
        suffix = None
    else:
        head, suffix = text.rsplit(":", 1)
        path = Path(head).expanduser()
    if not path.is_file():
        raise InvalidInputError(f"{option} {text!r}: no such file ({str(path)!r})")
    return path, suffix


def parse_lora(text: str) -> LoraArg:
    path, suffix = _split(text, "--lora")
    if suffix is None:
        return LoraArg(path, 1.0)
    scale = finite_number(suffix)
    if scale is None:
        raise InvalidInputError(f"--lora {text!r}: the scale after ':' must be a finite number, got {suffix!r}")
    return LoraArg(path, scale)


def finite_number(text: str) -> Optional[float]:
    """`text` as a finite float, or None when it is not one."""
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def parse_embedding(text: str) -> EmbeddingArg:
    path, token = _split(text, "--embedding")
    if token is not None and not token.strip():
        raise InvalidInputError(f"--embedding {text!r}: the token after ':' is empty")
    return EmbeddingArg(path, None if token is None else token.strip())


def parse_folder(text: str) -> Path:
    path = Path(text).expanduser()
    if not path.is_dir():
        raise InvalidInputError(f"--lora-dir {text!r}: not a folder")
    return path


def add_arguments(p: argparse.ArgumentParser, arg_type) -> None:
    """`arg_type` turns a checker into an argparse type (see sdrt.cli.generate)."""
    p.add_argument("--lora", type=arg_type(parse_lora), action="append", default=[], metavar="PATH[:SCALE]",
                   help="fuse this LoRA file at SCALE (default 1); repeatable")
    p.add_argument("--lora-dir", type=arg_type(parse_folder), action="append", default=[], metavar="DIR",
                   help="folder where the prompt's <lora:NAME:WEIGHT> tags find NAME (a file stem); repeatable")
    p.add_argument("--embedding", type=arg_type(parse_embedding), action="append", default=[],
                   metavar="PATH[:TOKEN]",
                   help="textual-inversion embedding; its prompt token is TOKEN, else the file's own (diffusers "
                        "files) or its stem; repeatable")


def load_adapters(pipe: Any, args: argparse.Namespace) -> list[str]:
    """Fuse the --lora files and load the --embedding files into `pipe`; returns the embeddings' tokens."""
    for lora in args.lora:
        pipe.load_lora(lora.path, scale=lora.scale)
    return [pipe.load_textual_inversion(e.path, token=e.token) for e in args.embedding]


def adapter_parameters(pipe: Any, args: argparse.Namespace, tokens: list[str]) -> dict:
    """What the PNG parameters record: every LoRA fused for the image (from --lora or a prompt tag) with its
    scale, file and A1111 short hash, `lora_hashes` in A1111's `name: hash, ...` form, the embeddings with their
    tokens and hashes, and the --lora-dir folders."""
    from sdrt.file_hashes import a1111_hash_list, short_hash

    out: dict = {}
    files = pipe.lora_files
    if files:
        loras = [{"name": name, "path": str(path.resolve()), "scale": pipe.loras[name], "hash": short_hash(path),
                  "from": "tag" if name in pipe.tag_loras else "--lora"} for name, path in files.items()]
        out.update(loras=loras, lora_hashes=a1111_hash_list({x["name"]: x["hash"] for x in loras}))
    if args.lora_dir:
        out.update(lora_dirs=[str(d.resolve()) for d in args.lora_dir])
    if args.embedding:
        out.update(embeddings=[{"path": str(e.path.resolve()), "token": token,
                                "hash": short_hash(e.path, skip_safetensors_header=False)}
                               for e, token in zip(args.embedding, tokens)])
    return out

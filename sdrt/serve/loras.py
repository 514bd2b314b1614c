"""LoRAs for `sdrt serve`: AUTOMATIC1111's `<lora:NAME:WEIGHT>` prompt tags, and the server's LoRA folder.

A request names a LoRA by its file stem only; the server maps names to the files it found in `--lora-dir`
at start (`sdrt.lora.folders`, the lookup `sdrt.load(lora_dirs=...)` uses), so no request can point at a path.
Tags are parsed by `sdrt.lora.tags` and the fused set synced by `sdrt.lora.prompt_loras.sync_loras`, as for a
pipeline's own tags. The pipeline's LoRA API (`load_lora`, `set_lora_scale`,
`unload_lora`, `loras`) makes the fused set match a batch's; a pipeline without it serves no LoRA.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional

from sdrt.errors import InvalidInputError
from sdrt.file_hashes import a1111_hash_list, short_hash
from sdrt.lora.folders import LoraFolders
from sdrt.lora.prompt_loras import sync_loras
from sdrt.lora.tags import parse_lora_tags

__all__ = ["LoraLibrary", "has_lora_api", "parse_lora_tags"]

LORA_SUFFIX = ".safetensors"  # pickled files are not served: a server loads only what cannot run code


def has_lora_api(pipe: Any) -> bool:
    return all(hasattr(pipe, name) for name in ("load_lora", "set_lora_scale", "unload_lora", "loras"))


class LoraLibrary:
    """The LoRA files a server may load, by name (file stem), found once in its folder (recursively)."""

    def __init__(self, folder: Optional[Path], available: bool):
        self.folder, self.available = folder, available
        found = {} if folder is None else LoraFolders([folder], (LORA_SUFFIX,), what="--lora-dir").files
        self.files: Mapping[str, Path] = found
        self._hashes: dict[tuple[Path, int, int], str] = {}  # (file, size, mtime) -> A1111 short hash

    def hash_list(self, loras: tuple[tuple[str, float], ...]) -> str:
        """The value of A1111's `Lora hashes` for these LoRAs ('name: 0123456789ab, ...'); '' for none. Each
        file is hashed once per version (size and mtime)."""
        hashes = {}
        for name, _ in loras:
            path = self.files[name]
            stat = path.stat()
            key = (path, stat.st_size, stat.st_mtime_ns)
            if key not in self._hashes:
                self._hashes[key] = short_hash(path)
            hashes[name] = self._hashes[key]
        return a1111_hash_list(hashes)

    def check(self, loras: tuple[tuple[str, float], ...]) -> None:
        """Raise InvalidInputError unless every named LoRA can be served."""
        if not loras:
            return
        if not self.available:
            raise InvalidInputError("LoRA support is not available in this sdrt build: remove the <lora:...> tags")
        if self.folder is None:
            raise InvalidInputError("LoRA support is not available on this server: it has no LoRA folder (sdrt serve "
                                    "--lora-dir); remove the <lora:...> tags")
        unknown = [name for name, _ in loras if name not in self.files]
        if unknown:
            known = ", ".join(sorted(self.files)) or "none"
            raise InvalidInputError(f"unknown LoRA name {unknown[0]!r}; this server has: {known}")

    def sync(self, pipe: Any, loras: tuple[tuple[str, float], ...]) -> None:
        """Make the pipeline's fused LoRAs exactly `loras`: unload the others, load or re-weight these."""
        if not loras and not getattr(pipe, "loras", None):
            return
        sync_loras(pipe, {name: (self.files[name], weight) for name, weight in loras}, managed=list(pipe.loras))

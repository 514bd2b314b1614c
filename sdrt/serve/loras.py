"""LoRAs for `sdrt serve`: AUTOMATIC1111's `<lora:NAME:WEIGHT>` prompt tags, and the server's LoRA folder.

A request names a LoRA by its file stem only; the server maps names to the files it found in `--lora-dir`
at start, so no request can point at a path. The pipeline's LoRA API (`load_lora`, `set_lora_scale`,
`unload_lora`, `loras`) makes the fused set match a batch's; a pipeline without it serves no LoRA.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Mapping, Optional

from sdrt.errors import InvalidInputError

TAG = re.compile(r"<lora:([^<>]*)>")
LORA_SUFFIX = ".safetensors"  # pickled files are not served: a server loads only what cannot run code


def parse_lora_tags(prompt: str) -> tuple[str, tuple[tuple[str, float], ...]]:
    """(the prompt without its <lora:NAME> / <lora:NAME:WEIGHT> tags, ((name, weight), ...) sorted by name)."""
    tags: dict[str, float] = {}
    for match in TAG.finditer(prompt):
        parts = [p.strip() for p in match.group(1).split(":")]
        if not parts[0] or len(parts) > 2:
            raise InvalidInputError(f"prompt tag {match.group(0)!r}: use <lora:NAME> or <lora:NAME:WEIGHT>")
        try:
            weight = float(parts[1]) if len(parts) == 2 else 1.0
        except ValueError:
            weight = math.nan
        if not math.isfinite(weight):
            raise InvalidInputError(f"prompt tag {match.group(0)!r}: the weight must be a finite number")
        if tags.get(parts[0], weight) != weight:
            raise InvalidInputError(f"prompt tag {match.group(0)!r}: {parts[0]!r} is tagged twice with different weights")
        tags[parts[0]] = weight
    return TAG.sub("", prompt), tuple(sorted(tags.items()))


def has_lora_api(pipe: Any) -> bool:
    return all(hasattr(pipe, name) for name in ("load_lora", "set_lora_scale", "unload_lora", "loras"))


class LoraLibrary:
    """The LoRA files a server may load, by name (file stem), found once in its folder (recursively)."""

    def __init__(self, folder: Optional[Path], available: bool):
        self.folder, self.available = folder, available
        files: dict[str, Path] = {}
        if folder is not None:
            for path in sorted(Path(folder).rglob(f"*{LORA_SUFFIX}")):
                files.setdefault(path.stem, path)
        self.files: Mapping[str, Path] = files

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
        wanted = dict(loras)
        if not wanted and not getattr(pipe, "loras", None):
            return
        current = dict(pipe.loras)
        for name in current:
            if name not in wanted:
                pipe.unload_lora(name)
        for name, weight in wanted.items():
            if name not in current:
                pipe.load_lora(self.files[name], scale=weight, name=name)
            elif current[name] != weight:
                pipe.set_lora_scale(name, weight)

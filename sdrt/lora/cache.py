"""Parsed LoRA files kept between loads, so switching back to a LoRA seen before skips reading and checking it.

A file is known by its resolved path, size and modification time: an edited or replaced file is read again.
Entries are kept most-recently-used first up to `max_bytes` of factors (float32, beside the weights); a LoRA
that is loaded stays usable whether or not its entry is evicted (the fuser holds its own reference)."""
from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Optional

from sdrt.lora.formats import LayerDelta

Layers = dict[str, LayerDelta]
DEFAULT_MAX_BYTES = 2 << 30


class ParsedLoraCache:
    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES):
        self.max_bytes = max_bytes
        self._entries: "OrderedDict[tuple, tuple[Layers, int]]" = OrderedDict()

    def get(self, path: Path, parse: Callable[[], Layers]) -> Layers:
        """The layers of the file at `path`, from the cache when the file is unchanged, else `parse()`d."""
        key = _file_key(path)
        if key is not None and key in self._entries:
            self._entries.move_to_end(key, last=False)
            return self._entries[key][0]
        layers = parse()
        if key is not None:
            size = sum(t.numel() * t.element_size() for layer in layers.values() for t in layer.factors.values())
            self._entries[key] = (layers, size)
            self._entries.move_to_end(key, last=False)
            self._evict()
        return layers

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def _evict(self) -> None:
        total = sum(size for _, size in self._entries.values())
        while self._entries and total > self.max_bytes:
            _, (_, size) = self._entries.popitem(last=True)
            total -= size


def _file_key(path: Path) -> Optional[tuple]:
    try:
        st = os.stat(path)
    except OSError:
        return None  # the reader reports the missing file
    return (str(path.resolve()), st.st_size, st.st_mtime_ns)

"""LoRA files by name in a list of folders, as AUTOMATIC1111 finds them: the file's stem, searched
recursively; the first folder (and, inside it, the first path in sorted order) that has the name wins.

The index is built on the first look-up and rebuilt once when a name is not in it, so a file added to a
folder after loading is found."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

from sdrt.errors import InvalidInputError

LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt", ".bin")  # pickles are read with weights_only=True


class LoraFolders:
    def __init__(self, folders: Iterable[Union[str, os.PathLike]], suffixes: Sequence[str] = LORA_SUFFIXES,
                 what: str = "lora_dirs"):
        self.folders = [Path(f).expanduser() for f in folders]
        for folder in self.folders:
            if not folder.is_dir():
                raise InvalidInputError(f"{what}: {str(folder)!r} is not a folder")
        self.suffixes = tuple(suffixes)
        self._index: Optional[dict[str, Path]] = None

    @property
    def files(self) -> dict[str, Path]:
        """name -> file, every LoRA the folders hold now."""
        if self._index is None:
            self._index = self._scan()
        return self._index

    def find(self, name: str) -> Path:
        """The file for `name`; InvalidInputError naming it and the folders searched when there is none."""
        path = self.files.get(name)
        if path is None:
            self._index = None
            path = self.files.get(name)
        if path is None:
            searched = ", ".join(repr(str(f)) for f in self.folders) or "none"
            raise InvalidInputError(f"unknown LoRA {name!r} in a <lora:...> tag: no {'/'.join(self.suffixes)} file "
                                    f"of that name in {searched}")
        return path

    def _scan(self) -> dict[str, Path]:
        files: dict[str, Path] = {}
        for folder in self.folders:
            for path in sorted(p for p in folder.rglob("*") if p.suffix in self.suffixes and p.is_file()):
                files.setdefault(path.stem, path)
        return files

"""The pipeline's LoRA methods: `load_lora`, `set_lora_scale`, `unload_lora`, `loras` (see README.md, LoRA)."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, ContextManager, Optional, Sequence, Union

from sdrt.errors import InvalidInputError, LoraFileError, ModelLoadError
from sdrt.lora.cache import ParsedLoraCache
from sdrt.lora.folders import LoraFolders
from sdrt.lora.formats import LayerDelta, parse_lora
from sdrt.lora.prompt_loras import Wanted, resolve, sync_loras, take_lora_tags
from sdrt.lora.fuser import LoraFuser
from sdrt.lora.exported import ExportedWeights, is_exported, require_new_weights
from sdrt.lora.targets import COMPONENTS, Target, TargetTable, torch_module
from sdrt.weights import read_tensors


class LoraMixin:
    """Mixed into `sdrt.Pipeline`: LoRAs fused into the U-Net and text encoder weights in place."""

    _lora_fuser: Optional[LoraFuser] = None
    _lora_table: Optional[TargetTable] = None
    _lora_exported: dict[str, ExportedWeights] = {}
    _lora_cache: ParsedLoraCache
    _lora_folders: Optional[LoraFolders] = None
    _tag_loras: frozenset[str] = frozenset()  # the LoRAs fused because prompt tags named them

    @property
    def loras(self) -> dict[str, float]:
        """{name: scale} of the fused LoRAs, in load order."""
        return {} if self._lora_fuser is None else self._lora_fuser.scales

    @property
    def tag_loras(self) -> frozenset[str]:
        """The names of the fused LoRAs that prompt tags asked for (the last call's tags)."""
        return self._tag_loras

    @property
    def lora_files(self) -> dict[str, Path]:
        """{name: file} of the fused LoRAs, in load order."""
        return {name: self._lora_paths[name] for name in self.loras}

    def load_lora(self, path: Union[str, os.PathLike], scale: float = 1.0, name: Optional[str] = None) -> str:
        """Fuse the LoRA file at `path` at `scale`; returns its name (default: the file stem). The whole file is
        read and checked against the model first: a bad one changes nothing."""
        if not isinstance(path, (str, os.PathLike)):
            raise InvalidInputError(f"path must be a LoRA file path (str or os.PathLike), got {type(path).__name__}")
        path = Path(path).expanduser()
        name = path.stem if name is None else name
        if not isinstance(name, str) or not name:
            raise InvalidInputError(f"name must be a non-empty string, got {name!r}")
        scale = _check_scale(scale)
        fuser = self._fuser()
        if name in fuser:
            raise InvalidInputError(f"a LoRA named {name!r} is already loaded: unload_lora({name!r}) first, "
                                    f"or pass another name=")
        layers = self._lora_cache.get(path, lambda: self._parse_lora(path))
        for component, exported in self._lora_exported.items():
            exported.check([layer.target for layer in layers.values() if layer.target.component == component], path)
        fuser.add(name, layers, scale)
        self._lora_paths[name] = path
        return name

    def set_lora_scale(self, name: str, scale: float) -> None:
        """Re-fuse the loaded LoRA `name` at `scale` (from the original weights, not incrementally)."""
        fuser = self._fuser()
        _check_loaded(fuser, name)
        fuser.set_scale(name, _check_scale(scale))

    def unload_lora(self, name: Optional[str] = None) -> None:
        """Take out the LoRA `name`, or all with None; the weights it touched return bit-identical."""
        fuser = self._fuser()
        if name is None:
            for loaded in reversed(list(fuser.scales)):
                fuser.remove(loaded)
            self._tag_loras = frozenset()
            return
        _check_loaded(fuser, name)
        fuser.remove(name)
        self._tag_loras -= {name}

    def batch_lora_changes(self) -> ContextManager[None]:
        """A block whose LoRA calls are fused once, at its end: `with pipe.batch_lora_changes():
        pipe.unload_lora("a"); pipe.load_lora(b)` rewrites each weight once instead of twice. Inside the block
        the weights are not yet updated: generate after it."""
        return self._fuser().batch()

    @property
    def lora_dirs(self) -> list[Path]:
        """The folders `<lora:NAME:WEIGHT>` prompt tags look NAME up in (see `sdrt.lora.prompt_loras`)."""
        return [] if self._lora_folders is None else list(self._lora_folders.folders)

    @lora_dirs.setter
    def lora_dirs(self, folders: Optional[Sequence[Union[str, os.PathLike]]]) -> None:
        self._lora_folders = None if folders is None else lora_folders(folders)

    def _take_lora_tags(self, prompt, negative_prompt) -> tuple[Any, Wanted]:
        """The prompt without its <lora:> tags, and the tag LoRAs it wants, files read and checked."""
        prompt, tags = take_lora_tags(prompt, negative_prompt, self._lora_folders)
        if not tags:
            return prompt, {}
        wanted = resolve(tags, self._lora_folders, set(self.loras) - self._tag_loras)
        self._fuser()
        for path, _ in wanted.values():
            self._lora_cache.get(path, lambda: self._parse_lora(path))
        return prompt, wanted

    def _sync_tag_loras(self, wanted: Wanted) -> None:
        if wanted or self._tag_loras:
            sync_loras(self, wanted, self._tag_loras)
            self._tag_loras = frozenset(wanted)

    def _parse_lora(self, path: Path) -> dict[str, LayerDelta]:
        try:
            tensors = read_tensors(path)
        except ModelLoadError as e:
            raise LoraFileError(f"LoRA {e}") from None
        return parse_lora(tensors, self._lora_table, path)

    def _fuser(self) -> LoraFuser:
        if self._lora_fuser is None:
            for c in COMPONENTS:
                if is_exported(getattr(self, c, None)):
                    require_new_weights(getattr(self, c), c)  # before the table, which needs the torch modules
            encoders = [getattr(self, c, None) for c in ("text_encoder", "text_encoder_2")]
            table = TargetTable(torch_module(self.unet), *(None if e is None else torch_module(e) for e in encoders))
            # exported graphs (onnxruntime, tensorrt): their initializers found now, while the weights are
            # still the ones exported
            exported = {c: ExportedWeights(getattr(self, c), table.unique(c), c)
                        for c in COMPONENTS if is_exported(getattr(self, c, None))}
            self._lora_table, self._lora_exported = table, exported
            self._lora_cache = ParsedLoraCache()
            self._lora_paths: dict[str, Path] = {}
            self._lora_fuser = LoraFuser()
            self._lora_fuser.on_change = self._push_to_exported
        return self._lora_fuser

    def _push_to_exported(self, changed: list[Target], restored: set[str]) -> None:
        for component, exported in self._lora_exported.items():
            exported.push([t for t in changed if t.component == component], restored)


def _check_scale(scale) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise InvalidInputError(f"scale must be a finite number, got {scale!r}")
    return float(scale)


def _check_loaded(fuser: LoraFuser, name) -> None:
    if name not in fuser:
        loaded = ", ".join(repr(n) for n in fuser.scales) or "none"
        raise InvalidInputError(f"no LoRA named {name!r} is loaded (loaded: {loaded})")


def lora_folders(folders) -> LoraFolders:
    """`lora_dirs=` checked: a list of existing folders (a single path is taken as a list of one)."""
    if isinstance(folders, (str, os.PathLike)):
        folders = [folders]
    if not isinstance(folders, (list, tuple)) or not all(isinstance(f, (str, os.PathLike)) for f in folders):
        raise InvalidInputError(f"lora_dirs must be a list of folder paths, got {folders!r:.80}")
    return LoraFolders(folders)

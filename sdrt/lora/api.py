"""The pipeline's LoRA methods: `load_lora`, `set_lora_scale`, `unload_lora`, `loras` (see README.md, LoRA)."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import ContextManager, Optional, Union

from sdrt.errors import InvalidInputError, LoraFileError, ModelLoadError
from sdrt.lora.formats import parse_lora
from sdrt.lora.fuser import LoraFuser
from sdrt.lora.exported import ExportedWeights, is_exported
from sdrt.lora.targets import COMPONENTS, Target, TargetTable, torch_module
from sdrt.weights import read_tensors


class LoraMixin:
    """Mixed into `sdrt.Pipeline`: LoRAs fused into the U-Net and text encoder weights in place."""

    _lora_fuser: Optional[LoraFuser] = None
    _lora_table: Optional[TargetTable] = None
    _lora_exported: dict[str, ExportedWeights] = {}

    @property
    def loras(self) -> dict[str, float]:
        """{name: scale} of the fused LoRAs, in load order."""
        return {} if self._lora_fuser is None else self._lora_fuser.scales

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
        try:
            tensors = read_tensors(path)
        except ModelLoadError as e:
            raise LoraFileError(f"LoRA {e}") from None
        layers = parse_lora(tensors, self._lora_table, path)
        for component, exported in self._lora_exported.items():
            exported.check([layer.target for layer in layers.values() if layer.target.component == component], path)
        fuser.add(name, layers, scale)
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
            return
        _check_loaded(fuser, name)
        fuser.remove(name)

    def batch_lora_changes(self) -> ContextManager[None]:
        """A block whose LoRA calls are fused once, at its end: `with pipe.batch_lora_changes():
        pipe.unload_lora("a"); pipe.load_lora(b)` rewrites each weight once instead of twice. Inside the block
        the weights are not yet updated: generate after it."""
        return self._fuser().batch()

    def _fuser(self) -> LoraFuser:
        if self._lora_fuser is None:
            table = TargetTable(torch_module(self.unet), torch_module(self.text_encoder))
            # exported graphs (onnxruntime, tensorrt): their initializers found now, while the weights are
            # still the ones exported
            exported = {c: ExportedWeights(getattr(self, c), table.unique(c), c)
                        for c in COMPONENTS if is_exported(getattr(self, c))}
            self._lora_table, self._lora_exported = table, exported
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

"""Fuse several LoRAs into a model's weights in place, each at its own scale, and take them out again exactly.

Every weight a LoRA touches is rewritten as `W = W0 + sum(scale_i * delta_i)`, computed in float32 and
written into the existing parameter storage: CUDA graphs, backend wrappers and anything else holding the
tensor see the new values, and nothing is recaptured or rebuilt. `W0`, the weight before any LoRA, is kept
(a copy in the weight's own dtype and device, taken the first time a LoRA touches it and kept from then on,
so a later switch does not pay for it again), so unloading writes back exactly the original bits rather than
subtracting in low precision. A weight known to hold W0's bits (just restored, or never fused) takes its
first delta in place (`W.addmm_`), the same arithmetic as `addmm(W0, out=W)` without reading W0. A change recomputes only the layers the loaded or unloaded LoRA touches; inside
`batch()` the changes of several calls are applied once, at its end (one pass over each weight per switch).
"""
from __future__ import annotations

import contextlib
from collections import OrderedDict
from typing import Callable, Iterable, Iterator, Optional

import torch

from sdrt.lora.formats import LayerDelta
from sdrt.lora.targets import Target

# called with the targets whose weights changed and, of those, the ones back to their original values
# (e.g. to refresh an exported graph)
ChangeHook = Callable[[list[Target], set[str]], None]


class LoraFuser:
    def __init__(self) -> None:
        self._loras: "OrderedDict[str, tuple[dict[str, LayerDelta], float]]" = OrderedDict()
        self._originals: dict[str, torch.Tensor] = {}  # target name -> W0
        self._pristine: set[str] = set()  # targets whose weight holds W0's exact bits now
        self._targets: dict[str, Target] = {}
        self._pending: Optional[set[str]] = None  # inside batch(): the targets to refuse at its end
        self.on_change: Optional[ChangeHook] = None

    @property
    def scales(self) -> dict[str, float]:
        return {name: scale for name, (_, scale) in self._loras.items()}

    def __contains__(self, name: str) -> bool:
        return name in self._loras

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Defer refusing to the end of the block (nested blocks join the outer one)."""
        if self._pending is not None:
            yield
            return
        self._pending = set()
        try:
            yield
        finally:
            touched, self._pending = self._pending, None
            self._refuse(touched)

    @torch.no_grad()
    def add(self, name: str, layers: dict[str, LayerDelta], scale: float) -> None:
        for layer in layers.values():
            self._targets.setdefault(layer.target.name, layer.target)
            if layer.target.name not in self._originals:
                self._originals[layer.target.name] = layer.target.weight.detach().clone()
                self._pristine.add(layer.target.name)
        self._loras[name] = (layers, scale)
        self._refuse(layers)

    @torch.no_grad()
    def set_scale(self, name: str, scale: float) -> None:
        layers, _ = self._loras[name]
        self._loras[name] = (layers, scale)
        self._refuse(layers)

    @torch.no_grad()
    def remove(self, name: str) -> None:
        layers, _ = self._loras.pop(name)
        self._refuse(layers)

    @torch.no_grad()
    def _refuse(self, touched: Iterable[str]) -> None:
        if self._pending is not None:
            self._pending.update(touched)
            return
        changed, restored = [], set()
        for target_name in touched:
            target, original = self._targets[target_name], self._originals[target_name]
            active = [(layers[target_name], scale) for layers, scale in self._loras.values() if target_name in layers]
            weight = target.weight
            if not active:  # back to the exact original bits
                if target_name not in self._pristine:
                    weight.copy_(original)
                    self._pristine.add(target_name)
                restored.add(target_name)
            elif weight.dtype == torch.float32:  # straight into the parameter's storage, one pass
                if target_name in self._pristine:  # the weight holds W0's bits: add in place, W0 not read
                    active[0][0].add_to(weight, active[0][1])
                else:
                    active[0][0].write_sum(weight, original, active[0][1])
                for layer, scale in active[1:]:
                    layer.add_to(weight, scale)
                self._pristine.discard(target_name)
            else:  # low precision: sum in float32, round once
                w = original.float()
                for layer, scale in active:
                    layer.add_to(w, scale)
                weight.copy_(w)
                self._pristine.discard(target_name)
            changed.append(target)
        if self.on_change is not None and changed:
            self.on_change(changed, restored)

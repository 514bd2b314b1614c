"""Fuse several LoRAs into a model's weights in place, each at its own scale, and take them out again exactly.

Every weight a LoRA touches is rewritten as `W = W0 + sum(scale_i * delta_i)`, computed in float32 and
written into the existing parameter storage with `copy_`: CUDA graphs, backend wrappers and anything else
holding the tensor see the new values, and nothing is recaptured or rebuilt. `W0`, the weight before any
LoRA, is kept (a copy in the weight's own dtype and device, taken the first time a LoRA touches it), so
unloading writes back exactly the original bits rather than subtracting in low precision. A switch
only recomputes the layers the loaded or unloaded LoRA touches.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Iterable, Optional

import torch

from sdrt.lora.formats import LayerDelta
from sdrt.lora.targets import Target

# called with the targets whose weights changed (their components), e.g. to refresh an exported graph
ChangeHook = Callable[[list[Target]], None]


class LoraFuser:
    def __init__(self) -> None:
        self._loras: "OrderedDict[str, tuple[dict[str, LayerDelta], float]]" = OrderedDict()
        self._originals: dict[str, torch.Tensor] = {}  # target name -> W0
        self._targets: dict[str, Target] = {}
        self.on_change: Optional[ChangeHook] = None

    @property
    def scales(self) -> dict[str, float]:
        return {name: scale for name, (_, scale) in self._loras.items()}

    def __contains__(self, name: str) -> bool:
        return name in self._loras

    @torch.no_grad()
    def add(self, name: str, layers: dict[str, LayerDelta], scale: float) -> None:
        for layer in layers.values():
            self._targets.setdefault(layer.target.name, layer.target)
            if layer.target.name not in self._originals:
                self._originals[layer.target.name] = layer.target.weight.detach().clone()
            # the factors live beside the weight, in float32, so a re-fuse is a few small matmuls
            layer.factors = {k: v.to(layer.target.weight.device, torch.float32) for k, v in layer.factors.items()}
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

    def _refuse(self, touched: Iterable[str]) -> None:
        changed = []
        for target_name in touched:
            target, original = self._targets[target_name], self._originals[target_name]
            active = [(layers[target_name], scale) for layers, scale in self._loras.values() if target_name in layers]
            if not active:  # back to the exact original bits; nothing more to keep for this weight
                target.weight.copy_(original)
                del self._originals[target_name], self._targets[target_name]
            else:
                w = original.float()
                for layer, scale in active:
                    w = w.add(layer.delta(), alpha=scale)
                target.weight.copy_(w)
            changed.append(target)
        if self.on_change is not None and changed:
            self.on_change(changed)

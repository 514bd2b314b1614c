"""Fused LoRA weights into exported graphs, with no re-export: ONNX Runtime sessions rebuilt with the changed
initializers overridden, TensorRT engines refitted with the changed weights only.

A graph component (`sdrt.export.graph_components`) keeps the torch module it was exported from: the fuser
writes there, and `ExportedWeights.push` carries the changed weights to the runner under their ONNX
initializer names (`sdrt.export.initializer_map`, found by value before the first fuse)."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Union

import torch

from sdrt.errors import BackendUnavailableError, LoraFileError
from sdrt.export.initializer_map import InitializerSlot, initializer_map
from sdrt.lora.targets import Target


def is_exported(component) -> bool:
    return hasattr(component, "runner")


def require_new_weights(component, name: str) -> None:
    """BackendUnavailableError unless the exported `component`'s graph can take new weights."""
    runner = component.runner
    if not (hasattr(runner, "override_initializers") or getattr(runner, "refittable", False)):
        raise BackendUnavailableError(f"the {name} graph cannot take new weights: LoRA runs on the torch, triton and "
                                      f"onnxruntime backends, and on tensorrt with engines built with refit "
                                      f"(prepare_engines(..., refit=True))")


class ExportedWeights:
    """One exported component's weight slots, and how to update its runner."""

    def __init__(self, component, targets: Iterable[Target], name: str):
        """`component` passed `require_new_weights`."""
        runner = self.runner = component.runner
        path = runner.path if hasattr(runner, "path") else runner.onnx_path
        dtype = next(component.module.parameters()).dtype
        weights = {t.module: t.weight for t in targets}
        self.slots: dict[str, InitializerSlot] = initializer_map(path, weights, dtype)

    def check(self, targets: Iterable[Target], source: Union[str, Path]) -> None:
        """LoraFileError for a layer whose weight the graph does not hold as an initializer (before any fuse)."""
        for t in targets:
            if t.module not in self.slots:
                raise LoraFileError(f"{source}: the exported graph holds {t.name}'s weight in no initializer "
                                    f"(folded into another constant), so a LoRA cannot change it without a re-export")

    def push(self, targets: Iterable[Target], restored: set[str]) -> None:
        """Send the targets' current weights to the runner (`restored`: target names back at their originals)."""
        targets = list(targets)
        if not targets:
            return
        if hasattr(self.runner, "override_initializers"):
            self.runner.override_initializers({self.slots[t.module].name: None if t.name in restored
                                               else self.slots[t.module].value(t.weight) for t in targets})
        else:
            values = {self.slots[t.module].name: self.slots[t.module].value(t.weight) for t in targets}
            self.runner.refit({name: torch.from_numpy(v) for name, v in values.items()})

"""Which backends run ControlNets, and fitting loaded ControlNets to a pipeline's backend: the torch backend
calls the modules; the onnxruntime backend runs them, and the U-Net with residual inputs, as exported graphs
(`sdrt.backends.onnxruntime_control`)."""
from __future__ import annotations

from typing import Any, Optional, Sequence

from sdrt.components import Components
from sdrt.errors import InvalidInputError
from sdrt.models.controlnet import ControlNet

CONTROL_BACKENDS = ("torch", "onnxruntime")


def check_controlnet_backend(controlnet: Any, backend: str, cuda_graphs: Optional[bool]) -> None:
    """Refuse, before loading anything, a ControlNet on a backend that cannot run one yet."""
    if controlnet is None:
        return
    if backend not in CONTROL_BACKENDS:
        raise InvalidInputError(f"controlnet needs backend {' or '.join(map(repr, CONTROL_BACKENDS))} (sdrt has no "
                                f"{backend} ControlNet yet), got backend={backend!r}")
    if cuda_graphs:
        raise InvalidInputError("controlnet runs without CUDA graphs: leave cuda_graphs unset or False")


def attach_controlnets(pipe: Any, components: Components, nets: Sequence[ControlNet]) -> None:
    """Give `pipe` its ControlNets on its backend; `components`: the torch modules the pipeline was built from."""
    if pipe.backend == "onnxruntime":
        from sdrt.backends.onnxruntime_control import prepare_control
        pipe.unet, nets = prepare_control(components, nets, pipe.device, pipe.dtype)
    pipe.controlnets = list(nets)

"""Which backends run ControlNets, and fitting loaded ControlNets to a pipeline's backend: the torch backend
calls the modules; the triton backend runs them with its kernels (`sdrt.backends.triton_control`); the
onnxruntime backend runs them, and the U-Net with residual inputs, as exported graphs
(`sdrt.backends.onnxruntime_control`). In a CUDA-graphed loop (torch or triton) the ControlNets run inside the
capture; what that bakes in is in the graph key (`sdrt.control.ControlResiduals.key`)."""
from __future__ import annotations

from typing import Any, Sequence

from sdrt.components import Components
from sdrt.errors import InvalidInputError
from sdrt.models.controlnet import ControlNet

CONTROL_BACKENDS = ("torch", "triton", "onnxruntime")


def check_controlnet_backend(controlnet: Any, backend: str) -> None:
    """Refuse, before loading anything, a ControlNet on a backend that cannot run one yet."""
    if controlnet is not None and backend not in CONTROL_BACKENDS:
        raise InvalidInputError(f"controlnet needs backend {', '.join(map(repr, CONTROL_BACKENDS))} (sdrt has no "
                                f"{backend} ControlNet yet), got backend={backend!r}")


def attach_controlnets(pipe: Any, components: Components, nets: Sequence[ControlNet]) -> None:
    """Give `pipe` its ControlNets on its backend; `components`: the torch modules the pipeline was built from."""
    if pipe.backend == "onnxruntime":
        if any(net.add_embedding is not None for net in nets):
            raise InvalidInputError("SDXL ControlNets run on the torch and triton backends so far, got "
                                    "backend='onnxruntime'")
        from sdrt.backends.onnxruntime_control import prepare_control
        pipe.unet, nets = prepare_control(components, nets, pipe.device, pipe.dtype)
    elif pipe.backend == "triton":
        from sdrt.backends.triton_control import TritonControlNet
        nets = [TritonControlNet(net, pipe.unet.kernels) for net in nets]
    pipe.controlnets = list(nets)

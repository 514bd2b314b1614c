"""The `triton` backend: the reference modules on CUDA in fp16 (or bf16), channels-last, with the fused Triton
kernels (GroupNorm+SiLU, flash attention) in place of the torch ops, and CUDA graphs around the text
encoder and the VAE decoder (the pipeline captures the denoising loop itself, see `sdrt.graphs`).

VAE decode and fp16: SD's VAE decoder can overflow fp16 on some latents (the decoded image turns to NaN,
the "black image" problem; diffusers' SDXL VAE config carries `force_upcast` for it). Keeping the whole
VAE in fp32 costs a fp32 decode on every image (on an H100 about 2x the fp16 decode time at 512x512:
`bench/test_bench_components.py::test_vae_decode` measures both). So the decoder stays in fp16 and its
output is checked for inf/NaN (one reduction and one host sync per decode, after the loop); on
overflow the decode reruns in fp32 on a copy of the VAE made on first need, and a warning says so.
bf16 has fp32's range and needs no fallback, but is checked the same way.

SDXL: the same wrappers on both text encoders (each reading graphed per batch size: the first encoder's
`penultimate`, the second's `sdxl_states`) and on the U-Net, whose added inputs (text_embeds, time_ids)
pass through to the reference module's "text_time" embedding; the refiner has no first encoder.

Without CUDA the kernels run only in Triton's interpreter (TRITON_INTERPRET=1 set before the first
kernel import), which is slow but lets tests run this backend on tiny models on a CPU.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import os
from typing import Optional, Union

import torch

from sdrt.components import Components
from sdrt.errors import BackendUnavailableError, InvalidInputError
from sdrt.graphs import GraphCache, ShapeGraphs
from sdrt.models.ops import use_kernels

log = logging.getLogger(__name__)

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# each component's graph cache: (batch, size) shapes kept at once, and its share of the GPU's memory
COMPONENT_GRAPHS = 4
COMPONENT_GRAPH_MEMORY = 0.1


def _kernels():
    try:
        import triton  # noqa: F401
    except ImportError:
        raise BackendUnavailableError("the triton backend needs the `triton` package: pip install triton") from None
    from sdrt.kernels import TritonKernels
    return TritonKernels()


class TritonUNet:
    """unet(sample, timestep, context, **added) with the Triton kernels on channels-last activations;
    added: SDXL's text_embeds and time_ids."""

    def __init__(self, module: torch.nn.Module, kernels):
        self.module, self.kernels, self.config = module, kernels, module.config

    def __call__(self, sample: torch.Tensor, timestep: Union[torch.Tensor, float, int],
                 context: torch.Tensor, **added: torch.Tensor) -> torch.Tensor:
        with use_kernels(self.kernels):
            out = self.module(sample.contiguous(memory_format=torch.channels_last), timestep, context, **added)
        return out.contiguous()


class TritonTextEncoder:
    """text_encoder(input_ids), and SDXL's readings `penultimate` / `sdxl_states` where the module has them;
    on CUDA one graph per reading and batch size."""

    def __init__(self, module: torch.nn.Module, graphs: Optional[GraphCache]):
        self.module, self.config = module, module.config
        self._run, self._penultimate, self._sdxl_states = (
            fn if graphs is None else ShapeGraphs(fn, graphs, name=f"text_encoder.{name}")
            for name, fn in (("forward", module), ("penultimate", getattr(module, "penultimate", None)),
                             ("sdxl_states", getattr(module, "sdxl_states", None))))

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self._run(input_ids)

    def penultimate(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._penultimate(input_ids)

    def sdxl_states(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._sdxl_states(input_ids)


class TritonVAE:
    """vae.encode / vae.decode with the kernels; decode graphed on CUDA, rerun in fp32 on overflow."""

    def __init__(self, module: torch.nn.Module, kernels, graphs: Optional[GraphCache]):
        self.module, self.kernels, self.config = module, kernels, module.config
        self._decode = self._decode_eager if graphs is None else ShapeGraphs(self._decode_eager, graphs,
                                                                              name="vae_decode")
        self._fp32: Optional[torch.nn.Module] = None
        self.fallbacks = 0  # decodes that overflowed and were rerun in fp32

    @property
    def scaling_factor(self) -> float:
        return self.config.scaling_factor

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with use_kernels(self.kernels):
            mean, logvar = self.module.encode(images.contiguous(memory_format=torch.channels_last))
        return mean.contiguous(), logvar.contiguous()

    def _decode_eager(self, latents: torch.Tensor) -> torch.Tensor:
        with use_kernels(self.kernels):
            out = self.module.decode(latents.contiguous(memory_format=torch.channels_last))
        return out.contiguous()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        images = self._decode(latents)
        if images.dtype == torch.float32 or torch.isfinite(images).all():
            return images
        self.fallbacks += 1
        log.warning("the %s VAE decode overflowed (inf/NaN); decoding again in float32", images.dtype)
        if self._fp32 is None:
            self._fp32 = copy.deepcopy(self.module).float()
        with use_kernels(self.kernels):
            out = self._fp32.decode(latents.float().contiguous(memory_format=torch.channels_last))
        return out.to(images.dtype).contiguous()  # pixels lie in about [-1, 1]: only the activations overflow


def prepare(components: Components, device: torch.device, dtype: torch.dtype) -> Components:
    return prepare_triton(components, device, dtype)


def prepare_triton(components: Components, device: torch.device, dtype: torch.dtype,
                   component_graphs: Optional[bool] = None) -> Components:
    """`components` on `device`/`dtype`, channels-last, run with the Triton kernels. component_graphs:
    CUDA-graph the text encoder and VAE decoder per input shape (default: on CUDA)."""
    device = torch.device(device)
    if dtype not in DTYPES:
        raise InvalidInputError(f"dtype must be one of float16, bfloat16, float32 for the triton backend, got {dtype}")
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise BackendUnavailableError(f"the triton backend needs CUDA (got device={device}); on a CPU its kernels "
                                      f"run only in Triton's interpreter: set TRITON_INTERPRET=1 (slow, for tests)")
    kernels = _kernels()
    if component_graphs is None:
        component_graphs = device.type == "cuda"
    if component_graphs and device.type != "cuda":
        raise InvalidInputError("component_graphs=True needs a CUDA device")
    for module in components.modules():  # SDXL's: both text encoders (the refiner has only the second)
        module.to(device=device, dtype=dtype).eval().requires_grad_(False)
    for module in (components.unet, components.vae):
        module.to(memory_format=torch.channels_last)
    graphs = (lambda: GraphCache.for_device(device, COMPONENT_GRAPHS, COMPONENT_GRAPH_MEMORY)) if component_graphs else (lambda: None)
    log.info("triton backend on %s/%s (component graphs %s)", device, dtype, "on" if component_graphs else "off")
    text_encoders = {name: TritonTextEncoder(getattr(components, name), graphs())
                     for name in ("text_encoder", "text_encoder_2") if getattr(components, name, None) is not None}
    return dataclasses.replace(components, **text_encoders, unet=TritonUNet(components.unet, kernels),
                               vae=TritonVAE(components.vae, kernels, graphs()))

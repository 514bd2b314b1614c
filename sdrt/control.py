"""ControlNet in the denoising loop: the call's control arguments checked, and the per-step residuals.

Semantics follow diffusers' StableDiffusionControlNet{,Img2Img,Inpaint}Pipeline and MultiControlNetModel:
- each ControlNet sees the U-Net's 4 latent channels, scaled for the step, the same timestep and context, and
  its control image in [0, 1] (not normalised), repeated per image and, under CFG, for both halves;
- several ControlNets' residuals are summed in the order given;
- a ControlNet is active at step j of the n the call runs (img2img: the truncated schedule) unless
  j / n < control_guidance_start or (j + 1) / n > control_guidance_end; inactive, it adds nothing;
- an unset controlnet_conditioning_scale is the diffusers pipeline's default for the mode (`DEFAULT_SCALES`:
  txt2img 1.0, img2img 0.8, inpainting 0.5);
- guess mode under CFG runs the ControlNets on the conditional half alone (the unconditional half gets no
  residual) with the skips' scales ramped from 0.1 to 1 (see `sdrt.models.controlnet`).
"""
from __future__ import annotations

import copy
import math
import numbers
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor

from sdrt import images as imgs
from sdrt.control_preprocess import check_preprocessor
from sdrt.control_preprocess import preprocess as run_preprocessor
from sdrt.errors import InvalidInputError
from sdrt.models.controlnet import ControlNet

Number = Union[float, int]
# diffusers' default controlnet_conditioning_scale per mode (StableDiffusionControlNet{,Img2Img,Inpaint}Pipeline)
DEFAULT_SCALES = {"txt2img": 1.0, "img2img": 0.8, "inpaint": 0.5}
SDXL_DEFAULT_SCALES = {"txt2img": 1.0, "img2img": 0.8, "inpaint": 1.0}  # StableDiffusionXLControlNet*Pipeline


@dataclass(frozen=True)
class ControlRequest:
    """A call's control arguments, checked; one entry per ControlNet."""

    images: list[Tensor]   # [1, 3, H, W] float32 in [0, 1], on the CPU
    scales: list[float]
    starts: list[float]
    ends: list[float]
    guess_mode: bool

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the control images (all the same: see `check_sizes`)."""
        return tuple(self.images[0].shape[-2:])

    def check_sizes(self, height: int, width: int) -> None:
        for i, image in enumerate(self.images):
            h, w = image.shape[-2:]
            if (h, w) != (height, width):
                raise InvalidInputError(f"{_name('control_image', i, len(self.images))} is {w}x{h} but the output "
                                        f"is {width}x{height}: give control images of the output's size")


def _name(arg: str, i: int, n: int) -> str:
    return f"{arg}[{i}]" if n > 1 else arg


def _per_net(name: str, value: Any, n: int, check) -> list:
    """One value for every ControlNet: a number applies to all, a list must hold one per ControlNet."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise InvalidInputError(f"{name} must be a number or a list of one per ControlNet ({n}), "
                                    f"got a list of {len(value)}")
        return [check(f"{name}[{i}]", v) for i, v in enumerate(value)]
    return [check(name, value)] * n


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise InvalidInputError(f"{name} must be a finite number, got {value!r:.80}")
    return float(value)


def _preprocessor(name: str, value: Any) -> Optional[str]:
    if value is not None:
        check_preprocessor(value)
    return value


def _fraction(name: str, value: Any) -> float:
    value = _number(name, value)
    if not 0.0 <= value <= 1.0:
        raise InvalidInputError(f"{name} must lie in [0, 1], got {value}")
    return value


def check_control(n_nets: int, control_image: Any, scale: Any, start: Any, end: Any, guess_mode: Any,
                  default_scale: float, preprocess: Any = None) -> Optional[ControlRequest]:
    """The control arguments of a call on a pipeline with `n_nets` ControlNets; None when it has none
    (and then every control argument must be left at its default). scale None: `default_scale`.
    preprocess: a preprocessor name (`sdrt.control_preprocess`) for every control image, or a list with one
    per ControlNet (None: that image is ready); None: all are ready."""
    if n_nets == 0:
        if control_image is not None or guess_mode is not False or scale is not None or preprocess is not None:
            raise InvalidInputError("control_image, controlnet_conditioning_scale, control_preprocess and "
                                    "guess_mode need a ControlNet: "
                                    "load the model with sdrt.load(model, controlnet=PATH)")
        return None
    if control_image is None:
        raise InvalidInputError(f"this pipeline has {n_nets} ControlNet{'s' * (n_nets > 1)}: pass control_image= "
                                f"(one image{' per ControlNet, as a list' * (n_nets > 1)})")
    listed = isinstance(control_image, (list, tuple))
    given = list(control_image) if listed else [control_image]
    if len(given) != n_nets:
        raise InvalidInputError(f"control_image must hold one image per ControlNet ({n_nets}), got {len(given)}")
    specs = _per_net("control_preprocess", preprocess, n_nets, _preprocessor)
    images = []
    for i, (image, spec) in enumerate(zip(given, specs)):
        try:
            images.append(imgs.image_to_tensor(image if spec is None else run_preprocessor(spec, image)))
        except InvalidInputError as e:
            raise InvalidInputError(f"{_name('control_image', i, n_nets)}: {e}") from None
    if len({tuple(t.shape) for t in images}) > 1:
        sizes = ", ".join(f"{t.shape[-1]}x{t.shape[-2]}" for t in images)
        raise InvalidInputError(f"the control images differ in size ({sizes}): give them all the output's size")
    if not isinstance(guess_mode, bool):
        raise InvalidInputError(f"guess_mode must be True or False, got {guess_mode!r:.80}")
    starts = _per_net("control_guidance_start", start, n_nets, _fraction)
    ends = _per_net("control_guidance_end", end, n_nets, _fraction)
    for i, (s, e) in enumerate(zip(starts, ends)):
        if s >= e:
            raise InvalidInputError(f"{_name('control_guidance_start', i, n_nets)}={s} must be below "
                                    f"{_name('control_guidance_end', i, n_nets)}={e}")
    scales = _per_net("controlnet_conditioning_scale", default_scale if scale is None else scale, n_nets, _number)
    return ControlRequest(images, scales, starts, ends, guess_mode)


class ControlResiduals:
    """The loop's `control(x, i, timestep, context)`: the summed residuals of every active ControlNet at step i
    as U-Net keyword arguments, or {} when none is active."""

    def __init__(self, nets: Sequence[ControlNet], request: ControlRequest, batch: int, cfg: bool, start: int,
                 total: int, device: torch.device, dtype: torch.dtype):
        self.nets, self.cfg, self.start = list(nets), cfg, start
        self.guess_mode = request.guess_mode or any(n.config.global_pool_conditions for n in nets)
        doubled = cfg and not self.guess_mode
        self.images = [img.to(device, dtype).expand(batch, -1, -1, -1).repeat(2 if doubled else 1, 1, 1, 1)
                       for img in request.images]
        # scale of each net at each step j of the run (0 = inactive), as diffusers' controlnet_keep
        self.scales = [[scale * (1.0 - float(j / total < s or (j + 1) / total > e))
                        for scale, s, e in zip(request.scales, request.starts, request.ends)] for j in range(total)]

    def key(self) -> tuple:
        """What a captured loop bakes in (`sdrt.graphs.DenoiseKey.control`): which ControlNet objects run, each
        one's scale at every step (0 = inactive: start/end), guess mode, CFG and the first step. The control
        images are not in it: a graph takes them as static inputs (`with_images`)."""
        return (tuple(id(n) for n in self.nets), tuple(map(tuple, self.scales)), self.guess_mode, self.cfg,
                self.start)

    def with_images(self, images: Sequence[Tensor]) -> "ControlResiduals":
        """The same residuals from other control-image tensors (a captured loop's static copies)."""
        if len(images) != len(self.images):
            raise InvalidInputError(f"expected {len(self.images)} control images, got {len(images)}")
        other = copy.copy(self)
        other.images = list(images)
        return other

    def __call__(self, x: Tensor, i: int, timestep: Tensor, context: Tensor, **added: Tensor) -> dict[str, Any]:
        # x: [B or 2B, 4, h, w] the scaled U-Net input; context: [B or 2B, 77, D]; added: SDXL's text_embeds
        # and time_ids, batched as the context
        guess_cfg = self.guess_mode and self.cfg
        if guess_cfg:
            x, context = x.chunk(2)[1], context.chunk(2)[1]
            added = {name: value.chunk(2)[1] for name, value in added.items()}
        down = mid = None
        for net, image, scale in zip(self.nets, self.images, self.scales[i - self.start]):
            if scale == 0.0:
                continue
            d, m = net(x, timestep, context, image, scale, self.guess_mode, **added)
            down = d if down is None else [a + b for a, b in zip(down, d)]
            mid = m if mid is None else mid + m
        if down is None:
            return {}
        if guess_cfg:
            down = [torch.cat([torch.zeros_like(d), d]) for d in down]
            mid = torch.cat([torch.zeros_like(mid), mid])
        return {"down_residuals": down, "mid_residual": mid}

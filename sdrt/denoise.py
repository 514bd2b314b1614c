"""The denoising loop: U-Net + classifier-free guidance + scheduler step, from a start index to the end.

Static shapes, no host syncs, no branching on tensor values, no random draws (the scheduler noise comes
in precomputed), so the whole loop can be captured in a CUDA graph. Latents stay in float32 across steps
whatever the model dtype; only the U-Net input is cast.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

from sdrt.errors import InvalidInputError
from sdrt.guidance import combine, per_sample_scale, uses_cfg
from sdrt.schedulers import Schedule, Scheduler


@dataclass(frozen=True)
class LatentBlend:
    """Inpainting with an ordinary 4-channel U-Net (diffusers' StableDiffusionInpaintPipeline does the same):
    after every step the region outside the mask is reset to the original image's latents noised to the
    next step's level, so the model only invents inside the mask."""

    mask: Tensor           # [B, 1, h, w], 1 = repaint
    image_latents: Tensor  # [B, 4, h, w], scaled by the VAE scaling factor
    noise: Tensor          # [B, 4, h, w], the noise of the initial latents

    def __call__(self, latents: Tensor, i: int, scheduler: Scheduler, schedule: Schedule) -> Tensor:
        if i + 1 < len(schedule.timesteps):
            proper = scheduler.add_noise(self.image_latents, self.noise, i + 1, schedule)
        else:
            proper = self.image_latents
        return (1 - self.mask) * proper + self.mask * latents


def denoise(unet: Callable, scheduler: Scheduler, schedule: Schedule, latents: Tensor, context: Tensor,
            guidance_scale: Union[float, Sequence[float], Tensor], start: int, step_noise: Sequence[Optional[Tensor]], *,
            condition: Optional[Tensor] = None, blend: Optional[LatentBlend] = None,
            on_step: Optional[Callable[[int], None]] = None, cfg: Optional[bool] = None,
            control: Optional[Callable[..., dict]] = None, added: Optional[Mapping[str, Tensor]] = None) -> Tensor:
    """latents: [B, 4, h, w] float32 at step `start`; context: [B or 2B, 77, D] ([uncond; cond] under CFG);
    step_noise[i]: the noise step i takes, or None; condition: extra U-Net input channels appended after
    scaling (the 9-channel inpainting U-Net's [mask, masked-image latents], already CFG-batched);
    added: extra keyword inputs of every U-Net call, batched as the context (SDXL's text_embeds [B or 2B, P]
    and time_ids [B or 2B, n]; see `check_added`). Returns the final latents [B, 4, h, w] float32.

    guidance_scale may be a list, one scale per sample; or a 0-d or [B, 1, 1, 1] device tensor (a CUDA
    graph's static input, so a new scale needs no recapture); `cfg` then says whether the context holds
    the [uncond; cond] batch. control(x, i, timestep, context, **added): the ControlNets' U-Net keyword
    arguments for step i from the scaled 4-channel input (`sdrt.control.ControlResiduals`)."""
    if torch.is_tensor(guidance_scale):
        if cfg is None:
            raise InvalidInputError("cfg must be given (True/False) when guidance_scale is a tensor")
    elif cfg is None:
        cfg = uses_cfg(guidance_scale)
    if isinstance(guidance_scale, (list, tuple)):
        if len(guidance_scale) != latents.shape[0]:
            raise InvalidInputError(f"a guidance_scale list needs one scale per sample ({latents.shape[0]}), "
                                    f"got {len(guidance_scale)}")
        guidance_scale = per_sample_scale(guidance_scale, latents.device)
    added = check_added(added, context)
    model_dtype = context.dtype
    state = scheduler.init_state(latents)
    for i in range(start, len(schedule.timesteps)):
        x = scheduler.scale_model_input(torch.cat([latents, latents]) if cfg else latents, i, schedule)
        residuals = {} if control is None else control(x.to(model_dtype), i, schedule.timesteps[i], context,
                                                            **added)
        if condition is not None:
            x = torch.cat([x, condition], dim=1)
        out = unet(x.to(model_dtype), schedule.timesteps[i], context, **added, **residuals)
        noise_pred = combine(out.float(), guidance_scale) if cfg else out.float()
        latents = scheduler.step(noise_pred, i, latents, schedule, noise=step_noise[i], state=state)
        if blend is not None:
            latents = blend(latents, i, scheduler, schedule)
        if on_step is not None:
            on_step(i)
    return latents



def check_added(added: Optional[Mapping[str, Tensor]], context: Tensor) -> dict[str, Tensor]:
    """The U-Net's added inputs as a dict ({} for none): tensors [N, ...] with the context's batch N and dtype
    (a capture bakes their shapes in; a wrong batch would broadcast silently in the time embedding)."""
    if added is None:
        return {}
    if not isinstance(added, Mapping):
        raise InvalidInputError(f"added must be None or a mapping of U-Net input names to tensors, got "
                                f"{type(added).__name__}")
    for name, value in added.items():
        if not torch.is_tensor(value):
            raise InvalidInputError(f"added[{name!r}] must be a tensor, got {type(value).__name__}")
        if value.dim() < 1 or value.shape[0] != context.shape[0] or value.dtype != context.dtype \
                or value.device != context.device:
            raise InvalidInputError(f"added[{name!r}] must be a {str(context.dtype).removeprefix('torch.')} tensor "
                                    f"[{context.shape[0]}, ...] on {context.device} (batched as the context), got "
                                    f"{list(value.shape)} {str(value.dtype).removeprefix('torch.')} on {value.device}")
    return dict(added)

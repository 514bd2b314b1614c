"""diffusers twins of sdrt's random-weight models (`sdrt.models.random_weights`): the same configs, the same
weights copied in, so a side-by-side benchmark runs identical numbers on both sides."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch

from sdrt.components import Components

_DOWN_VAE, _UP_VAE = "DownEncoderBlock2D", "UpDecoderBlock2D"


def _copy_weights(target: torch.nn.Module, source: dict[str, torch.Tensor]) -> None:
    """Load sdrt's state dict into a diffusers/transformers module; sdrt's CLIP keys carry the
    'text_model.' prefix that transformers 5 drops."""
    want = target.state_dict()
    mapped = {k: source[k] if k in source else source["text_model." + k] for k in want}
    target.load_state_dict(mapped)


def diffusers_twin(make: Callable[[], torch.nn.Module], module: torch.nn.Module, device: Any,
                   dtype: torch.dtype) -> torch.nn.Module:
    """`make()` (a diffusers/transformers model of `module`'s config) built on meta, given `module`'s weights."""
    with torch.device("meta"):
        model = make()
    model = model.to_empty(device=device)
    for name, buffer in model.named_buffers():  # to_empty leaves buffers unset: CLIP's position ids
        if name.endswith("position_ids"):
            buffer.copy_(torch.arange(buffer.shape[-1], device=device).expand_as(buffer))
    _copy_weights(model, {k: v.to(device) for k, v in module.state_dict().items()})
    return model.to(dtype).eval().requires_grad_(False)


def diffusers_pipeline(parts: Components, device: Any, dtype: torch.dtype):
    """A diffusers StableDiffusionPipeline (StableDiffusionXLPipeline for SDXL components) with `parts`' configs
    and weights (copied), on `device`/`dtype`, with DDIM. The tokenizers are not used by the benchmarks (they pass
    prompt embeddings): placeholders stand in."""
    import diffusers
    from diffusers import AutoencoderKL as DAutoencoderKL
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig as TCLIPTextConfig
    from transformers import CLIPTextModel as TCLIPTextModel
    from transformers import CLIPTextModelWithProjection as TCLIPTextModelWithProjection

    ucfg, vcfg = parts.unet.config, parts.vae.config
    nv = len(vcfg.block_out_channels)
    second = getattr(parts, "text_encoder_2", None)  # SDXL's OpenCLIP bigG, with its projection
    specs = [(lambda: UNet2DConditionModel(**dataclasses.asdict(ucfg)), parts.unet),
             (lambda: DAutoencoderKL(**dataclasses.asdict(vcfg), down_block_types=(_DOWN_VAE,) * nv,
                                     up_block_types=(_UP_VAE,) * nv), parts.vae),
             (lambda: TCLIPTextModel(TCLIPTextConfig(**dataclasses.asdict(parts.text_encoder.config))),
              parts.text_encoder)]
    if second is not None:
        specs.append((lambda: TCLIPTextModelWithProjection(TCLIPTextConfig(**dataclasses.asdict(second.config))),
                      second))
    built = [diffusers_twin(make, module, device, dtype) for make, module in specs]
    unet, vae, text_encoder, *text_encoder_2 = built
    scheduler = DDIMScheduler.from_config(parts.scheduler_config)
    if text_encoder_2:
        pipe = diffusers.StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2[0],
                                                   tokenizer=None, tokenizer_2=None, unet=unet, scheduler=scheduler,
                                                   add_watermarker=False)
    else:
        pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=None, unet=unet,
                                                 scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                                 requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe

"""Random-weight Stable Diffusion models built in memory for benchmarks: no folder, no download.

sdrt's modules are built on the meta device, materialised on the target device and filled there with a
seeded random init (fan-in scaled, so activations keep their scale through the deep U-Net; norms at
1, biases at 0). `diffusers_pipeline(components)` builds diffusers' models from the same configs and
copies the same weights in, so both sides of a comparison run identical numbers.

Configs: `tiny` (the CPU model, a few MB), `sd15` (SD 1.5: 512x512, epsilon), `sd21` (SD 2.1: 768x768,
OpenCLIP-H text tower, v-prediction). The tokenizer is a byte-level CLIP BPE (no merges): every prompt
still encodes; only the ids differ from the real vocabulary's, which random weights cannot tell apart.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

from sdrt.components import SD_SCHEDULER_CONFIG, Components
from sdrt.config import CLIPTextConfig, UNetConfig, VAEConfig
from sdrt.models.clip import CLIPTextModel
from sdrt.models.unet import UNet
from sdrt.models.vae import AutoencoderKL
from sdrt.tokenizer import CLIPTokenizer

MODELS = ("tiny", "sd15", "sd21")

_SD_VAE = VAEConfig(block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=512)
CONFIGS: dict[str, tuple[CLIPTextConfig, UNetConfig, VAEConfig, dict]] = {
    "tiny": (CLIPTextConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                            projection_dim=128),
             UNetConfig(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=128,
                        attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
             VAEConfig(block_out_channels=(32, 64), layers_per_block=1, sample_size=16),
             dict(SD_SCHEDULER_CONFIG)),
    "sd15": (CLIPTextConfig(), UNetConfig(), _SD_VAE, dict(SD_SCHEDULER_CONFIG)),
    "sd21": (CLIPTextConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                            hidden_act="gelu", projection_dim=1024),
             UNetConfig(sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                        use_linear_projection=True, upcast_attention=True),
             dataclasses.replace(_SD_VAE, sample_size=768),
             dict(SD_SCHEDULER_CONFIG, prediction_type="v_prediction")),
}
_DOWN_VAE, _UP_VAE = "DownEncoderBlock2D", "UpDecoderBlock2D"


def byte_tokenizer() -> CLIPTokenizer:
    """CLIP's byte-level BPE alphabet with no merges: every character is a token."""
    symbols = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars = [chr(c) for c in symbols] + [chr(256 + n) for n in range(256 - len(symbols))]
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer({t: i for i, t in enumerate(tokens)}, [], source="byte tokenizer")


@torch.no_grad()
def random_init_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Fill every parameter in place: matrices/kernels ~ N(0, 1/fan_in), 1-d weights 1, biases 0."""
    gen = torch.Generator(device=next(module.parameters()).device).manual_seed(seed)
    for name, p in module.named_parameters():
        if p.dim() >= 2:
            p.normal_(0.0, p[0].numel() ** -0.5, generator=gen)
        elif name.endswith("bias"):
            p.zero_()
        else:
            p.fill_(1.0)
    return module


def components(name: str, device: Any = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0) -> Components:
    """sdrt Components of the `name` config with random weights, built directly on `device` in fp32 and
    then cast to `dtype`."""
    if name not in CONFIGS:
        raise ValueError(f"model must be one of {', '.join(MODELS)}, got {name!r}")
    ccfg, ucfg, vcfg, scheduler = CONFIGS[name]
    modules = []
    for i, (cls, cfg) in enumerate(((CLIPTextModel, ccfg), (UNet, ucfg), (AutoencoderKL, vcfg))):
        with torch.device("meta"):
            module = cls(cfg)
        module = random_init_(module.to_empty(device=device), seed + i)
        modules.append(module.to(dtype).eval().requires_grad_(False))
    return Components(byte_tokenizer(), *modules, scheduler_config=dict(scheduler), source=f"random {name}")


def _copy_weights(target: torch.nn.Module, source: dict[str, torch.Tensor]) -> None:
    """Load sdrt's state dict into a diffusers/transformers module; sdrt's CLIP keys carry the
    'text_model.' prefix that transformers 5 drops."""
    want = target.state_dict()
    mapped = {k: source[k] if k in source else source["text_model." + k] for k in want}
    target.load_state_dict(mapped)


def diffusers_pipeline(parts: Components, device: Any, dtype: torch.dtype):
    """A diffusers StableDiffusionPipeline with `parts`' configs and weights (copied), on `device`/`dtype`.
    The tokenizer is not used by the benchmarks (they pass prompt embeddings): a placeholder stands in."""
    from diffusers import AutoencoderKL as DAutoencoderKL
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig as TCLIPTextConfig
    from transformers import CLIPTextModel as TCLIPTextModel

    ucfg, vcfg = parts.unet.config, parts.vae.config
    nv = len(vcfg.block_out_channels)
    built = []
    for make, module in ((lambda: UNet2DConditionModel(**dataclasses.asdict(ucfg)), parts.unet),
                         (lambda: DAutoencoderKL(**dataclasses.asdict(vcfg), down_block_types=(_DOWN_VAE,) * nv,
                                                 up_block_types=(_UP_VAE,) * nv), parts.vae),
                         (lambda: TCLIPTextModel(TCLIPTextConfig(**dataclasses.asdict(parts.text_encoder.config))),
                          parts.text_encoder)):
        with torch.device("meta"):
            model = make()
        model = model.to_empty(device=device)
        for name, buffer in model.named_buffers():  # to_empty leaves buffers unset: CLIP's position ids
            if name.endswith("position_ids"):
                buffer.copy_(torch.arange(buffer.shape[-1], device=device).expand_as(buffer))
        _copy_weights(model, {k: v.to(device) for k, v in module.state_dict().items()})
        built.append(model.to(dtype).eval().requires_grad_(False))
    unet, vae, text_encoder = built
    scheduler = DDIMScheduler.from_config(parts.scheduler_config)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=None, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe

"""Random-weight Stable Diffusion models built in memory: no folder, no download (benchmarks, `sdrt check
--model random:NAME`, tests).

sdrt's modules are built on the meta device, materialised on the target device and filled there with a
seeded random init (fan-in scaled, so activations keep their scale through the deep U-Net; norms at
1, biases at 0). `sdrt.bench.models.diffusers_pipeline(components)` builds diffusers' models from the
same configs and copies the same weights in, so both sides of a comparison run identical numbers.

Configs: `tiny` (the CPU model, a few MB), `sd15` (SD 1.5: 512x512, epsilon), `sd21` (SD 2.1: 768x768,
OpenCLIP-H text tower, v-prediction), `sdxl` (SDXL base 1.0: 1024x1024, CLIP ViT-L + OpenCLIP bigG, per-level
transformer depth (1, 2, 10), "text_time" conditioning) and `tiny-sdxl` (its CPU-sized twin: two 64-wide
encoders, depth (1, 2)). The tokenizer (both tokenizers for SDXL) is a byte-level CLIP BPE (no merges): every prompt
still encodes; only the ids differ from the real vocabulary's, which random weights cannot tell apart.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

from sdrt.components import SD_SCHEDULER_CONFIG, Components
from sdrt.config import CLIPTextConfig, UNetConfig, VAEConfig
from sdrt.errors import InvalidInputError
from sdrt.models.clip import CLIPTextModel, CLIPTextModelWithProjection
from sdrt.models.unet import UNet
from sdrt.models.vae import AutoencoderKL
from sdrt.sdxl_components import SDXL_SCHEDULER_CONFIG, SDXLComponents
from sdrt.tokenizer import CLIPTokenizer

MODELS = ("tiny", "sd15", "sd21", "tiny-sdxl", "sdxl")

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

# SDXL: (CLIP ViT-L, OpenCLIP bigG with projection, U-Net, VAE, scheduler), values of SDXL base 1.0's configs
_SDXL_LEVELS = dict(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))
SDXL_CONFIGS: dict[str, tuple[CLIPTextConfig, CLIPTextConfig, UNetConfig, VAEConfig, dict]] = {
    "tiny-sdxl": (CLIPTextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                                 projection_dim=64),
                  CLIPTextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                                 hidden_act="gelu", projection_dim=32),
                  UNetConfig(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                             cross_attention_dim=128, attention_head_dim=(1, 2), transformer_layers_per_block=(1, 2),
                             use_linear_projection=True, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                             up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), addition_embed_type="text_time",
                             addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8),
                  VAEConfig(block_out_channels=(32, 64), layers_per_block=1, sample_size=16, scaling_factor=0.13025),
                  dict(SDXL_SCHEDULER_CONFIG)),
    "sdxl": (CLIPTextConfig(),
             CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                            hidden_act="gelu", projection_dim=1280),
             UNetConfig(sample_size=128, block_out_channels=(320, 640, 1280), cross_attention_dim=2048,
                        attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10),
                        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                        projection_class_embeddings_input_dim=2816, **_SDXL_LEVELS),
             dataclasses.replace(_SD_VAE, sample_size=1024, scaling_factor=0.13025),
             dict(SDXL_SCHEDULER_CONFIG)),
}


def unet_vae_configs(name: str) -> tuple[UNetConfig, VAEConfig]:
    """The U-Net and VAE configs of the `name` model."""
    if name in SDXL_CONFIGS:
        return SDXL_CONFIGS[name][2:4]
    return CONFIGS[name][1:3]


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
    """sdrt Components of the `name` config with random weights (SDXLComponents for the SDXL configs: a base,
    with force_zeros_for_empty_prompt), built directly on `device` in fp32 and then cast to `dtype`."""
    if name in SDXL_CONFIGS:
        first, second, ucfg, vcfg, scheduler = SDXL_CONFIGS[name]
        text_encoder, unet, vae, text_encoder_2 = _random_modules(
            ((CLIPTextModel, first), (UNet, ucfg), (AutoencoderKL, vcfg), (CLIPTextModelWithProjection, second)),
            device, dtype, seed)
        return SDXLComponents(byte_tokenizer(), text_encoder, unet, vae, scheduler_config=dict(scheduler),
                              source=f"random {name}", tokenizer_2=byte_tokenizer(), text_encoder_2=text_encoder_2)
    if name not in CONFIGS:
        raise InvalidInputError(f"model must be one of {', '.join(MODELS)}, got {name!r}")
    ccfg, ucfg, vcfg, scheduler = CONFIGS[name]
    modules = _random_modules(((CLIPTextModel, ccfg), (UNet, ucfg), (AutoencoderKL, vcfg)), device, dtype, seed)
    return Components(byte_tokenizer(), *modules, scheduler_config=dict(scheduler), source=f"random {name}")


def _random_modules(specs, device: Any, dtype: torch.dtype, seed: int) -> list[torch.nn.Module]:
    """(class, config) pairs -> modules built on the meta device, then materialised on `device` with
    `random_init_` (seed + their index)."""
    modules = []
    for i, (cls, cfg) in enumerate(specs):
        with torch.device("meta"):
            module = cls(cfg)
        module = random_init_(module.to_empty(device=device), seed + i)
        modules.append(module.to(dtype).eval().requires_grad_(False))
    return modules

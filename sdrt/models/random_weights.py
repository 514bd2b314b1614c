"""Random-weight Stable Diffusion models built in memory: no folder, no download (benchmarks, `sdrt check
--model random:NAME`, tests).

sdrt's modules are built on the meta device, materialised on the target device and filled there with a
seeded random init (fan-in scaled, so activations keep their scale through the deep U-Net; norms at
1, biases at 0). `sdrt.bench.models.diffusers_pipeline(components)` builds diffusers' models from the
same configs and copies the same weights in, so both sides of a comparison run identical numbers.

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
from sdrt.errors import InvalidInputError
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
        raise InvalidInputError(f"model must be one of {', '.join(MODELS)}, got {name!r}")
    ccfg, ucfg, vcfg, scheduler = CONFIGS[name]
    modules = []
    for i, (cls, cfg) in enumerate(((CLIPTextModel, ccfg), (UNet, ucfg), (AutoencoderKL, vcfg))):
        with torch.device("meta"):
            module = cls(cfg)
        module = random_init_(module.to_empty(device=device), seed + i)
        modules.append(module.to(dtype).eval().requires_grad_(False))
    return Components(byte_tokenizer(), *modules, scheduler_config=dict(scheduler), source=f"random {name}")

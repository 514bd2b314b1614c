"""Random LoRA files in the formats people have, written for the tiny test models (see factories.py).

Each writer takes a diffusers pipeline (its modules give the layer names and shapes) and returns the tensors
it saved, so a test can load the same file through diffusers and through sdrt."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import save_file
from torch import nn

# the layers the files cover: all attention and feed-forward projections, the resnets' convs (LoCon),
# and the text encoder's attention and MLP
UNET_PARTS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
              "conv1", "conv2", "conv_shortcut", "time_emb_proj")
TEXT_PARTS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def lora_layers(module: nn.Module, parts: tuple[str, ...]) -> dict[str, nn.Module]:
    """name -> layer; text encoder names as SD checkpoints spell them (transformers >= 5 drops `text_model.`)."""
    text = any(n.endswith("self_attn") for n, _ in module.named_modules())
    return {("text_model." + name if text and not name.startswith("text_model.") else name): m
            for name, m in module.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv2d)) and any(name.endswith("." + p) for p in parts)}


def _factors(m: nn.Module, rank: int, g: torch.Generator, conv_rank_kernel: bool = True):
    """(down, up) for module m: a LoCon pair on a kxk conv (down carries the kernel), else a linear pair."""
    if isinstance(m, nn.Conv2d):
        k = m.kernel_size
        down = torch.randn(rank, m.in_channels, *k, generator=g) * 0.2
        up = torch.randn(m.out_channels, rank, 1, 1, generator=g) * 0.2
    else:
        down = torch.randn(rank, m.in_features, generator=g) * 0.2
        up = torch.randn(m.out_features, rank, generator=g) * 0.2
    return down, up


def write_kohya(path: Path, reference, seed: int, rank: int = 4, alpha: Optional[float] = 2.0,
                ldm_names: Optional[dict[str, str]] = None, text_encoder: bool = True) -> dict[str, torch.Tensor]:
    """kohya / AUTOMATIC1111: lora_unet_<flat>.lora_down/up.weight + .alpha (LoCon on the 3x3 convs).
    ldm_names: our U-Net module name -> the original LDM name, to write that spelling instead."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    groups = [("lora_unet_", reference.unet, UNET_PARTS)]
    if text_encoder:
        groups.append(("lora_te_", reference.text_encoder, TEXT_PARTS))
    for prefix, root, parts in groups:
        for name, m in lora_layers(root, parts).items():
            down, up = _factors(m, rank, g)
            spelled = (ldm_names or {}).get(name, name) if prefix == "lora_unet_" else name
            key = prefix + spelled.replace(".", "_")
            tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"] = down, up
            if alpha is not None:
                tensors[f"{key}.alpha"] = torch.tensor(alpha)
    save_file(tensors, str(path))
    return tensors


def write_peft(path: Path, reference, seed: int, rank: int = 4) -> dict[str, torch.Tensor]:
    """diffusers / PEFT: unet.<module>.lora_A/lora_B.weight and text_encoder.<module>.lora_A/lora_B.weight."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for prefix, root, parts in (("unet.", reference.unet, UNET_PARTS),
                                ("text_encoder.", reference.text_encoder, TEXT_PARTS)):
        for name, m in lora_layers(root, parts).items():
            down, up = _factors(m, rank, g)
            tensors[f"{prefix}{name}.lora_A.weight"], tensors[f"{prefix}{name}.lora_B.weight"] = down, up
    save_file(tensors, str(path))
    return tensors

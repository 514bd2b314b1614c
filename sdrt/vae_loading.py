"""A VAE given apart from the model (`sdrt.load(model, vae=PATH)`, CLI `--vae PATH`), e.g. SDXL's fp16-fix VAE.

PATH: a diffusers VAE folder (config.json + weights; its config's scaling_factor and force_upcast hold), or a
single .safetensors/.ckpt VAE in the original layout (`encoder.down.0.block.0...`, with or without
`first_stage_model.`): its architecture is read from the shapes, its scaling factor is the model's own VAE's,
and force_upcast is off (a file cannot say; an overflowing fp16 decode is still redone in float32, see
`sdrt.vae_precision`). It must fit the model: the same latent channels and downsampling (an SD3/Flux
16-channel VAE, say, is refused by name).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Union

import torch

from sdrt import single_file as sf
from sdrt.components import build_from_file, load_component
from sdrt.config import VAEConfig, check_config
from sdrt.errors import ModelLoadError
from sdrt.models.vae import AutoencoderKL
from sdrt.weights import read_tensors


def load_separate_vae(path: Union[str, Path], model_vae: VAEConfig, dtype: torch.dtype,
                      device: Union[str, torch.device]) -> AutoencoderKL:
    """The VAE at `path` on `device`/`dtype`, checked against the model's VAE config `model_vae`."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelLoadError(f"vae not found: {path} (expected a diffusers VAE folder or a .safetensors file)")
    try:
        vae = load_component(path, "vae", dtype, device) if path.is_dir() else _load_file(path, model_vae,
                                                                                          dtype, device)
    except ModelLoadError as e:  # named as the argument; most messages name the file already
        raise ModelLoadError(f"vae: {e}" if str(path) in str(e) else f"vae={path}: {e}") from None
    for what in ("latent_channels", "downsample_factor"):
        if getattr(vae.config, what) != getattr(model_vae, what):
            raise ModelLoadError(f"vae={path} does not fit the model: {what} {getattr(vae.config, what)}, the "
                                 f"model's VAE has {getattr(model_vae, what)}")
    return vae


def _load_file(path: Path, model_vae: VAEConfig, dtype: torch.dtype, device) -> AutoencoderKL:
    tensors = read_tensors(path)
    if not any(k.startswith(sf.VAE_PREFIX) for k in tensors):
        tensors = {sf.VAE_PREFIX + k: v for k, v in tensors.items()}
    if sf.VAE_PREFIX + "encoder.down.0.block.0.conv1.weight" not in tensors:
        raise ModelLoadError("not a VAE in the original layout (no 'encoder.down.0.block.0.*' tensors); for a "
                             "diffusers-layout VAE pass its folder (config.json + weights)")
    cfg = dataclasses.replace(sf.infer_vae_config(tensors), scaling_factor=model_vae.scaling_factor,
                              force_upcast=False)
    check_config(cfg, path)
    return build_from_file(AutoencoderKL, cfg, tensors, sf.VAE_PREFIX, sf.vae_rules(cfg), path, dtype, device)

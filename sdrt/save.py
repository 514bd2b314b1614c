"""Write components as a diffusers-format folder that diffusers/transformers load unchanged."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Union

from safetensors.torch import save_file
from torch import nn

from sdrt import __version__
from sdrt.config import CLIPTextConfig, UNetConfig, VAEConfig

_DIFFUSERS_VERSION = "0.30.0"  # the format version these configs follow; diffusers reads newer and older alike


def unet_config_json(cfg: UNetConfig) -> dict:
    return {"_class_name": "UNet2DConditionModel", "_diffusers_version": _DIFFUSERS_VERSION,
            **_plain(dataclasses.asdict(cfg)), "act_fn": "silu", "center_input_sample": False,
            "mid_block_type": "UNetMidBlock2DCrossAttn"}


def vae_config_json(cfg: VAEConfig) -> dict:
    n = len(cfg.block_out_channels)
    return {"_class_name": "AutoencoderKL", "_diffusers_version": _DIFFUSERS_VERSION, **_plain(dataclasses.asdict(cfg)),
            "act_fn": "silu", "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n}


def clip_config_json(cfg: CLIPTextConfig) -> dict:
    return {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", **_plain(dataclasses.asdict(cfg)),
            "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1, "torch_dtype": "float32"}


def _plain(d: dict) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items() if v is not None}


def _write_component(folder: Path, config: dict, module: nn.Module, weights_name: str) -> None:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    tensors = {k: v.detach().float().contiguous().cpu() for k, v in module.state_dict().items()}
    save_file(tensors, str(folder / weights_name), metadata={"format": "pt"})


def save_folder(path: Union[str, Path], *, text_encoder, unet, vae, tokenizer_folder: Path,
                scheduler_config: dict) -> Path:
    """Write a complete diffusers folder at `path` atomically (built beside it, then renamed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        (tmp / "model_index.json").write_text(json.dumps({
            "_class_name": "StableDiffusionPipeline", "_diffusers_version": _DIFFUSERS_VERSION,
            "_sdrt_version": __version__,
            "feature_extractor": [None, None], "requires_safety_checker": False, "safety_checker": [None, None],
            "scheduler": ["diffusers", scheduler_config["_class_name"]], "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"]}, indent=2))
        _write_component(tmp / "text_encoder", clip_config_json(text_encoder.config), text_encoder, "model.safetensors")
        _write_component(tmp / "unet", unet_config_json(unet.config), unet, "diffusion_pytorch_model.safetensors")
        _write_component(tmp / "vae", vae_config_json(vae.config), vae, "diffusion_pytorch_model.safetensors")
        shutil.copytree(tokenizer_folder, tmp / "tokenizer")
        (tmp / "scheduler").mkdir()
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config, indent=2))
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path

"""SDXL base and refiner folders (diffusers layout): two tokenizers and text encoders, the U-Net with
added conditioning, the VAE, and the pipeline flags that model_index.json carries."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch

from sdrt.components import Components, load_component
from sdrt.config import read_json
from sdrt.errors import ModelLoadError
from sdrt.models.clip import CLIPTextModelWithProjection
from sdrt.tokenizer import EOS_TOKEN, CLIPTokenizer

log = logging.getLogger(__name__)

SDXL_PIPELINES = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline")


@dataclass
class SDXLComponents(Components):
    """SD components plus SDXL's second encoder. The refiner has no first encoder (text_encoder None)."""

    tokenizer_2: Optional[CLIPTokenizer] = None
    text_encoder_2: Optional[CLIPTextModelWithProjection] = None
    force_zeros_for_empty_prompt: bool = True  # no negative prompt under CFG -> zero negative embeddings
    requires_aesthetics_score: bool = False    # the refiner: time ids end with an aesthetic score, not a size

    def modules(self) -> list[torch.nn.Module]:
        return super().modules() + [self.text_encoder_2]


def load_sdxl_folder(root: Path, index: dict, dtype: torch.dtype, device: Union[str, torch.device],
                     tokenizer: Union[str, Path, None]) -> SDXLComponents:
    """A diffusers SDXL folder; `tokenizer` (a folder) replaces the first tokenizer only."""
    has_first = _names_component(index, "text_encoder")
    if not _names_component(index, "text_encoder_2"):
        raise ModelLoadError(f"{root / 'model_index.json'}: an SDXL pipeline without text_encoder_2 is not supported")
    text_encoder = load_component(root / "text_encoder", "text_encoder", dtype, device) if has_first else None
    text_encoder_2 = load_component(root / "text_encoder_2", "text_encoder_2", dtype, device)
    unet = load_component(root / "unet", "unet", dtype, device)
    vae = load_component(root / "vae", "vae", dtype, device)
    if unet.config.addition_embed_type != "text_time":
        raise ModelLoadError(f"{root / 'unet' / 'config.json'}: an SDXL U-Net needs addition_embed_type='text_time'")
    width = (text_encoder.config.hidden_size if text_encoder is not None else 0) + text_encoder_2.config.hidden_size
    if width != unet.config.cross_attention_dim:
        raise ModelLoadError(f"{root}: the text encoders give {width}-wide contexts, the U-Net's "
                             f"cross_attention_dim is {unet.config.cross_attention_dim}")
    tok = None
    if has_first:
        tok = _tokenizer(Path(tokenizer).expanduser() if tokenizer is not None else root / "tokenizer", EOS_TOKEN,
                         required=tokenizer is not None)
    tok_2 = _tokenizer(root / "tokenizer_2", "!", required=False)
    flags = {key: index.get(key, default) for key, default in (("force_zeros_for_empty_prompt", True),
                                                                ("requires_aesthetics_score", False))}
    for key, value in flags.items():
        if not isinstance(value, bool):
            raise ModelLoadError(f"{root / 'model_index.json'}: invalid value {key}={value!r}: must be true or false")
    scheduler_config = read_json(root / "scheduler" / "scheduler_config.json")
    return SDXLComponents(tok, text_encoder, unet, vae, scheduler_config, str(root), tokenizer_2=tok_2,
                          text_encoder_2=text_encoder_2, **flags)


def _names_component(index: dict, name: str) -> bool:
    """model_index.json lists a component as [library, class]; a missing one (the refiner's first encoder) as
    [null, null] or not at all."""
    entry = index.get(name)
    return isinstance(entry, list) and len(entry) == 2 and entry[1] is not None


def _tokenizer(folder: Path, pad: str, required: bool) -> CLIPTokenizer:
    if folder.is_dir() or required:
        return CLIPTokenizer.from_folder(folder)
    log.info("%s: missing; using the CLIP vocabulary bundled with sdrt, pad token %r", folder, pad)
    return CLIPTokenizer.bundled(pad_token=pad)

"""SDXL base and refiner folders (diffusers layout) and single files (Stability's layout): two tokenizers and
text encoders, the U-Net with added conditioning, the VAE, and the pipeline flags that model_index.json carries
(a single file's follow from which towers it holds: the refiner has bigG alone)."""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch

from sdrt import single_file as sf
from sdrt.components import Components, build_from_file, load_component
from sdrt.config import check_config, read_json
from sdrt.errors import ModelLoadError
from sdrt.models.clip import CLIPTextModel, CLIPTextModelWithProjection
from sdrt.models.unet import UNet
from sdrt.models.vae import AutoencoderKL
from sdrt.sdxl_variants import check_folder, check_single_file
from sdrt.tokenizer import EOS_TOKEN, CLIPTokenizer

log = logging.getLogger(__name__)

SDXL_PIPELINES = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline")
SDXL_NATIVE_SAMPLE = 128  # latents of SDXL's 1024x1024
# the scheduler config SDXL base 1.0 and the refiner ship, for single files (which carry none)
SDXL_SCHEDULER_CONFIG = {"_class_name": "EulerDiscreteScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
                         "beta_end": 0.012, "beta_schedule": "scaled_linear", "interpolation_type": "linear",
                         "prediction_type": "epsilon", "steps_offset": 1, "timestep_spacing": "leading",
                         "use_karras_sigmas": False, "clip_sample": False, "set_alpha_to_one": False}


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
    check_folder(root)  # the variants sdrt refuses by name, before any weight is read
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


def load_sdxl_single_file(path: Path, tensors: dict, dtype: torch.dtype, device: Union[str, torch.device],
                          tokenizer: Union[str, Path, None], prediction_type: Optional[str]) -> SDXLComponents:
    """An SDXL base or refiner single file (`conditioner.embedders.*`, `model.diffusion_model.*`,
    `first_stage_model.*`). Tokenizers: `tokenizer` (or a tokenizer/ folder beside the file) for CLIP ViT-L,
    a tokenizer_2/ folder beside it for bigG, else the bundled CLIP vocabulary (padded with EOS and "!")."""
    check_single_file(path, tensors)
    first_cfg, bigg_cfg, bigg_prefix = sf.sdxl_text_configs(tensors)
    ucfg = dataclasses.replace(sf.infer_unet_config(tensors), sample_size=SDXL_NATIVE_SAMPLE)
    vcfg = sf.infer_vae_config(tensors)
    for cfg in (ucfg, vcfg, first_cfg, bigg_cfg):  # inferred from shapes, which a damaged file may hold in any size
        if cfg is not None:
            check_config(cfg, path)
    unet = build_from_file(UNet, ucfg, tensors, sf.UNET_PREFIX, sf.unet_rules(ucfg), path, dtype, device)
    vae = build_from_file(AutoencoderKL, vcfg, tensors, sf.VAE_PREFIX, sf.vae_rules(vcfg), path, dtype, device)
    text_encoder = tok = None
    if first_cfg is not None:
        text_encoder = build_from_file(CLIPTextModel, first_cfg, tensors, sf.SDXL_CLIP_PREFIX,
                                       sf.clip_rules(first_cfg, False), path, dtype, device)
        tok = _tokenizer(Path(tokenizer).expanduser() if tokenizer is not None else path.parent / "tokenizer",
                         EOS_TOKEN, required=tokenizer is not None)
    text_encoder_2 = build_from_file(CLIPTextModelWithProjection, bigg_cfg, tensors, bigg_prefix,
                                     sf.clip_rules(bigg_cfg, True), path, dtype, device)
    width = (0 if first_cfg is None else first_cfg.hidden_size) + bigg_cfg.hidden_size
    if width != ucfg.cross_attention_dim:
        raise ModelLoadError(f"{path}: the text encoders give {width}-wide contexts, the U-Net's cross_attention_dim "
                             f"is {ucfg.cross_attention_dim}")
    # v-prediction SDXL files say so (a v_pred marker, the model spec, a .yaml); ztsnr marks zero terminal SNR
    found = sf.infer_prediction_type(path, tensors, sd2=False, inpainting=False).value
    scheduler_config = dict(SDXL_SCHEDULER_CONFIG, prediction_type=prediction_type or found,
                            rescale_betas_zero_snr="ztsnr" in tensors)
    refiner = first_cfg is None
    return SDXLComponents(tok, text_encoder, unet, vae, scheduler_config, str(path),
                          tokenizer_2=_tokenizer(path.parent / "tokenizer_2", "!", required=False),
                          text_encoder_2=text_encoder_2, force_zeros_for_empty_prompt=not refiner,
                          requires_aesthetics_score=refiner)

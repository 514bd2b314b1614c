"""Load the five parts of a Stable Diffusion model from a diffusers folder or a single-file checkpoint."""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch

from sdrt import sdxl_variants, single_file as sf
from sdrt.checks import check_prediction_type
from sdrt.clip_vocab import VOCAB_SIZE
from sdrt.config import CLIPTextConfig, check_config, clip_text_config, read_json, unet_config, vae_config
from sdrt.errors import InvalidInputError, ModelLoadError
from sdrt.models.clip import (CLIPTextModel, CLIPTextModelWithProjection, IGNORED_KEYS as CLIP_IGNORED_KEYS,
                              checkpoint_state_dict, projection_state_dict)
from sdrt.models.unet import UNet
from sdrt.models.vae import AutoencoderKL
from sdrt.tokenizer import EOS_TOKEN, CLIPTokenizer
from sdrt.weights import assign_checked, build_module, find_weights_file, read_tensors

log = logging.getLogger(__name__)

BUNDLED_MODEL = Path(__file__).resolve().parent / "assets" / "tiny-sd"
SUPPORTED_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline")

# The scheduler every SD 1.x/2.x release ships (diffusers' conversion writes the same values).
SD_SCHEDULER_CONFIG = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
                       "beta_end": 0.012, "beta_schedule": "scaled_linear", "clip_sample": False,
                       "set_alpha_to_one": False, "steps_offset": 1, "prediction_type": "epsilon",
                       "timestep_spacing": "leading"}


@dataclass
class Components:
    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    unet: UNet
    vae: AutoencoderKL
    scheduler_config: dict = field(default_factory=dict)
    source: str = ""

    @property
    def is_inpainting_unet(self) -> bool:
        return self.unet.config.in_channels == 9

    def modules(self) -> list[torch.nn.Module]:
        """The neural components a backend prepares (SDXL adds its second text encoder)."""
        return [m for m in (self.text_encoder, self.unet, self.vae) if m is not None]


def load_components(model: Union[str, Path, None], dtype: torch.dtype = torch.float32,
                    device: Union[str, torch.device] = "cpu", tokenizer: Union[str, Path, None] = None,
                    prediction_type: Optional[str] = None) -> Components:
    """`model`: a diffusers folder, a single-file checkpoint, or None for the bundled tiny model.
    The tokenizer: the `tokenizer` folder when given, else the model's `tokenizer/` folder (for a single file, one
    beside it), else CLIP's vocabulary bundled with sdrt, padded as the text encoder's family pads.
    prediction_type: "epsilon" | "v_prediction" overrides what the model says (a folder's scheduler config)
    or what is inferred (a single file: see `sdrt.single_file.infer_prediction_type`); None = the model's."""
    prediction_type = check_prediction_type(prediction_type)
    path = BUNDLED_MODEL if model is None else Path(model).expanduser()
    if path.is_dir():
        components = _load_folder(path, dtype, device, tokenizer)
        if prediction_type is not None and components.scheduler_config.get("prediction_type") != prediction_type:
            log.info("%s: prediction_type %s (the scheduler config says %s)", path, prediction_type,
                     components.scheduler_config.get("prediction_type", "epsilon"))
            components.scheduler_config = dict(components.scheduler_config, prediction_type=prediction_type)
        return components
    if path.is_file():
        return _load_single_file(path, dtype, device, tokenizer, prediction_type)
    raise ModelLoadError(f"model not found: {path} (expected a diffusers folder or a .safetensors checkpoint)")


def _load_folder(root: Path, dtype, device, tokenizer: Union[str, Path, None]) -> Components:
    index = read_json(root / "model_index.json")
    kind = index.get("_class_name")
    from sdrt import sdxl_components  # SDXL's loader builds on this module
    if kind in sdxl_components.SDXL_PIPELINES:
        return sdxl_components.load_sdxl_folder(root, index, dtype, device, tokenizer)
    sdxl_variants.refuse_pipeline_class(root / "model_index.json", kind)
    if kind not in SUPPORTED_PIPELINES:
        raise ModelLoadError(f"{root / 'model_index.json'}: unsupported pipeline _class_name={kind!r} "
                             f"(sdrt supports {', '.join(SUPPORTED_PIPELINES + sdxl_components.SDXL_PIPELINES)})")
    text_encoder, unet, vae = (load_component(root / name, name, dtype, device)
                               for name in ("text_encoder", "unet", "vae"))
    scheduler_config = read_json(root / "scheduler" / "scheduler_config.json")
    folder = Path(tokenizer).expanduser() if tokenizer is not None else root / "tokenizer"
    if folder.is_dir() or tokenizer is not None:
        tok = CLIPTokenizer.from_folder(folder)
    else:
        # OpenCLIP's text encoder (SD 2.x) is the one with exact GELU; OpenAI's CLIP ViT-L (SD 1.x) has quick_gelu
        tok = _bundled_tokenizer(root, text_encoder.config, openclip=text_encoder.config.hidden_act == "gelu")
    return Components(tok, text_encoder, unet, vae, scheduler_config, str(root))


def load_component(folder: Union[str, Path], name: str, dtype: torch.dtype = torch.float32,
                   device: Union[str, torch.device] = "cpu") -> torch.nn.Module:
    """One diffusers component folder (config.json + weights). name: "text_encoder" | "text_encoder_2" (SDXL's
    CLIPTextModelWithProjection) | "unet" | "vae".
    With dtype=float16 the folder's `*.fp16.safetensors` variant is preferred when it has one."""
    if name not in _COMPONENTS:
        raise InvalidInputError(f"name must be one of {', '.join(_COMPONENTS)}, got {name!r}")
    read_config, factory, convert, ignored = _COMPONENTS[name]
    folder = Path(folder)
    cfg = read_config(read_json(folder / "config.json"), str(folder / "config.json"))
    weights = find_weights_file(folder, prefer_fp16=dtype == torch.float16)
    return build_module(lambda: factory(cfg), convert(read_tensors(weights)), weights, dtype, device, ignored)


def _rename_legacy_vae_attention(tensors: dict) -> dict:
    """Older diffusers VAEs (SD 1.5's among them) name the mid-block attention query/key/value/proj_attn."""
    legacy = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}
    out = {}
    for key, value in tensors.items():
        for old, new in legacy.items():
            if old in key:
                key = key.replace(old, new)
                value = value.reshape(value.shape[0], -1) if value.dim() == 4 else value
        out[key] = value
    return out


# name -> (config reader, module class, checkpoint key conversion, checkpoint keys to drop)
_COMPONENTS = {
    "text_encoder": (clip_text_config, CLIPTextModel, checkpoint_state_dict, CLIP_IGNORED_KEYS),
    "text_encoder_2": (clip_text_config, CLIPTextModelWithProjection, projection_state_dict, CLIP_IGNORED_KEYS),
    "unet": (unet_config, UNet, dict, ()),
    "vae": (vae_config, AutoencoderKL, _rename_legacy_vae_attention, ()),
}


def _load_single_file(path: Path, dtype, device, tokenizer: Union[str, Path, None],
                      prediction_type: Optional[str]) -> Components:
    tensors = read_tensors(path)
    if not sf.is_single_file(tensors):
        raise ModelLoadError(f"{path}: not a Stable Diffusion checkpoint (no '{sf.UNET_PREFIX}*' tensors)")
    if sf.is_sdxl(tensors):
        from sdrt import sdxl_components  # SDXL's loader builds on this module
        return sdxl_components.load_sdxl_single_file(path, tensors, dtype, device, tokenizer, prediction_type)
    tensors = sf.normalize_clip_keys(tensors)
    ucfg, vcfg = sf.infer_unet_config(tensors), sf.infer_vae_config(tensors)
    ccfg, openclip = sf.infer_clip_config(tensors)
    prediction_type = _single_file_prediction_type(path, tensors, openclip, ucfg.in_channels == 9, prediction_type)
    ucfg = dataclasses.replace(ucfg, sample_size=sf.native_sample_size(openclip, prediction_type))
    for cfg in (ucfg, vcfg, ccfg):  # inferred from tensor shapes, which a damaged file may hold in any size
        check_config(cfg, path)

    def build(factory, cfg, prefix, rules):
        return build_from_file(factory, cfg, tensors, prefix, rules, path, dtype, device)

    unet = build(UNet, ucfg, sf.UNET_PREFIX, sf.unet_rules(ucfg))
    vae = build(AutoencoderKL, vcfg, sf.VAE_PREFIX, sf.vae_rules(vcfg))
    text_encoder = build(CLIPTextModel, ccfg, sf.OPENCLIP_PREFIX if openclip else sf.CLIP_PREFIX,
                         sf.clip_rules(ccfg, openclip))
    scheduler_config = dict(SD_SCHEDULER_CONFIG, prediction_type=prediction_type)
    return Components(_single_file_tokenizer(path, tokenizer, text_encoder.config, openclip), text_encoder, unet, vae,
                      scheduler_config, str(path))


def build_from_file(factory, cfg, tensors: dict, prefix: str, rules: list, path: Path, dtype,
                    device) -> torch.nn.Module:
    """One module of a single file: built on the meta device, its tensors read through the key table."""
    with torch.device("meta"):
        module = factory(cfg)
    sd = sf.convert(list(module.state_dict()), tensors, prefix, rules, str(path))
    return assign_checked(module, sd, path, dtype, device)


def _single_file_prediction_type(path: Path, tensors: dict, sd2: bool, inpainting: bool,
                                 override: Optional[str]) -> str:
    if override is not None:
        log.info("%s: prediction_type %s, as given", path, override)
        return override
    found = sf.infer_prediction_type(path, tensors, sd2, inpainting)
    if found.guessed:
        log.warning("%s: %s (v-prediction at 768x768); if it is a 512 base (epsilon) model, pass "
                    "prediction_type='epsilon' (CLI: --prediction-type epsilon)", path, found.evidence)
    else:
        log.info("%s: prediction_type %s (from %s)", path, found.value, found.evidence)
    return found.value


def _single_file_tokenizer(path: Path, tokenizer: Union[str, Path, None], text_config: CLIPTextConfig,
                           openclip: bool) -> CLIPTokenizer:
    """Single files carry no vocabulary: take it from `tokenizer`, else a `tokenizer/` folder beside the file
    that holds one, else the bundled one."""
    folder = Path(tokenizer).expanduser() if tokenizer is not None else path.parent / "tokenizer"
    if not any((folder / name).is_file() for name in ("vocab.json", "tokenizer.json")):
        if tokenizer is None:
            return _bundled_tokenizer(path, text_config, openclip)
        raise ModelLoadError(f"tokenizer={tokenizer}: no vocab.json + merges.txt or tokenizer.json in {folder}")
    configured = any((folder / name).is_file() for name in ("tokenizer_config.json", "special_tokens_map.json"))
    if openclip and not configured:
        # a bare vocabulary cannot say which pad token to use; SD 2.x (OpenCLIP) pads with "!"
        return CLIPTokenizer.from_files(folder / "vocab.json", folder / "merges.txt", pad_token="!")
    return CLIPTokenizer.from_folder(folder)


def _bundled_tokenizer(model: Path, text_config: CLIPTextConfig, openclip: bool) -> CLIPTokenizer:
    """CLIP's vocabulary shipped with sdrt, for a model that carries none: SD 2.x pads with "!", SD 1.x with EOS."""
    if text_config.vocab_size != VOCAB_SIZE:
        raise ModelLoadError(f"{model}: no tokenizer, and the text encoder's {text_config.vocab_size}-token embedding "
                             f"does not fit CLIP's {VOCAB_SIZE}-token vocabulary; pass tokenizer=<folder>")
    pad = "!" if openclip else EOS_TOKEN
    log.info("%s: no tokenizer folder; using the CLIP vocabulary bundled with sdrt, pad token %r (SD %s)",
             model, pad, "2.x" if openclip else "1.x")
    return CLIPTokenizer.bundled(pad_token=pad)

"""Dataclass configs, read from the `config.json` files diffusers and transformers write.

Each reader takes the raw dict, keeps the fields we model, and refuses (ModelLoadError, naming the key
and value) any setting that would change the architecture in a way we do not implement, so an
unsupported model fails at load time, never with a shape error later.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

from sdrt.errors import ModelLoadError


def read_json(path: Union[str, Path]) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"missing config file: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{path}: not a readable JSON config ({e})") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object")
    return data


def _check_supported(raw: Mapping[str, Any], required: Mapping[str, Sequence[Any]], source: str) -> None:
    """Every key in `required` must be absent or hold one of its allowed values."""
    for key, allowed in required.items():
        if key in raw and raw[key] not in allowed:
            raise ModelLoadError(f"{source}: unsupported config value {key}={raw[key]!r} "
                                 f"(sdrt supports {', '.join(repr(a) for a in allowed)})")


def _build(cls, raw: Mapping[str, Any], source: str):
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in raw.items() if k in names}
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ModelLoadError(f"{source}: incomplete config ({e})") from None


# ---------------------------------------------------------------------------------------------- CLIP
@dataclass(frozen=True)
class CLIPTextConfig:
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 768  # unused by the text encoder's hidden states; kept for round trips


_CLIP_REQUIRED = {"hidden_act": ("quick_gelu", "gelu")}


def clip_text_config(raw: Mapping[str, Any], source: str = "text_encoder/config.json") -> CLIPTextConfig:
    _check_supported(raw, _CLIP_REQUIRED, source)
    return _build(CLIPTextConfig, raw, source)


# ----------------------------------------------------------------------------------------------- VAE
@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple = (64,)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 32
    scaling_factor: float = 0.18215
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    @property
    def downsample_factor(self) -> int:
        """Image pixels per latent pixel: every level but the last halves the resolution."""
        return 2 ** (len(self.block_out_channels) - 1)


_VAE_REQUIRED = {
    "act_fn": ("silu",),
    "shift_factor": (None, 0, 0.0),
    "latents_mean": (None,),
    "latents_std": (None,),
}


def vae_config(raw: Mapping[str, Any], source: str = "vae/config.json") -> VAEConfig:
    _check_supported(raw, _VAE_REQUIRED, source)
    for key, kind in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        for block in raw.get(key, ()):
            if block != kind:
                raise ModelLoadError(f"{source}: unsupported config value {key} entry {block!r} (sdrt supports {kind!r})")
    cfg = _build(VAEConfig, raw, source)
    if "down_block_types" in raw and len(raw["down_block_types"]) != len(cfg.block_out_channels):
        raise ModelLoadError(f"{source}: down_block_types and block_out_channels differ in length")
    return cfg


# ---------------------------------------------------------------------------------------------- UNet
@dataclass(frozen=True)
class UNetConfig:
    sample_size: int = 64
    in_channels: int = 4
    out_channels: int = 4
    down_block_types: tuple = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
    up_block_types: tuple = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
    block_out_channels: tuple = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 768
    # diffusers' historical misnomer: for SD 1.x/2.x `attention_head_dim` holds the number of heads
    # per block unless `num_attention_heads` is given.
    attention_head_dim: Union[int, tuple] = 8
    num_attention_heads: Optional[Union[int, tuple]] = None
    use_linear_projection: bool = False
    upcast_attention: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0

    def heads(self) -> tuple:
        """Number of attention heads for each down block (the up path mirrors it)."""
        h = self.num_attention_heads if self.num_attention_heads is not None else self.attention_head_dim
        return tuple(h) if isinstance(h, (tuple, list)) else (h,) * len(self.block_out_channels)


_UNET_REQUIRED = {
    "act_fn": ("silu",),
    "center_input_sample": (False,),
    "mid_block_type": ("UNetMidBlock2DCrossAttn",),
    "only_cross_attention": (False,),
    "dual_cross_attention": (False,),
    "resnet_time_scale_shift": ("default",),
    "class_embed_type": (None,),
    "addition_embed_type": (None,),
    "num_class_embeds": (None,),
    "time_cond_proj_dim": (None,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "time_embedding_type": ("positional",),
    "time_embedding_dim": (None,),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "conv_in_kernel": (3,),
    "conv_out_kernel": (3,),
    "transformer_layers_per_block": (1,),
    "reverse_transformer_layers_per_block": (None,),
    "attention_type": ("default",),
    "cross_attention_norm": (None,),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1, 1.0),
    "class_embeddings_concat": (False,),
    "mid_block_only_cross_attention": (None, False),
    "addition_time_embed_dim": (None,),
    "projection_class_embeddings_input_dim": (None,),
}
_UNET_DOWN = ("CrossAttnDownBlock2D", "DownBlock2D")
_UNET_UP = ("CrossAttnUpBlock2D", "UpBlock2D")


def unet_config(raw: Mapping[str, Any], source: str = "unet/config.json") -> UNetConfig:
    _check_supported(raw, _UNET_REQUIRED, source)
    for key, kinds in (("down_block_types", _UNET_DOWN), ("up_block_types", _UNET_UP)):
        for block in raw.get(key, ()):
            if block not in kinds:
                raise ModelLoadError(f"{source}: unsupported config value {key} entry {block!r} "
                                     f"(sdrt supports {', '.join(map(repr, kinds))})")
    for key in ("layers_per_block", "cross_attention_dim"):
        if isinstance(raw.get(key), list):
            raise ModelLoadError(f"{source}: unsupported config value {key}={raw[key]!r} (sdrt supports a single int)")
    cfg = _build(UNetConfig, raw, source)
    n = len(cfg.block_out_channels)
    if len(cfg.down_block_types) != n or len(cfg.up_block_types) != n or len(cfg.heads()) != n:
        raise ModelLoadError(f"{source}: block types, block_out_channels and attention heads differ in length")
    return cfg

"""Dataclass configs, read from the `config.json` files diffusers and transformers write.

Each reader takes the raw dict, keeps the fields we model, and refuses (ModelLoadError, naming the key
and value) any setting that would change the architecture in a way we do not implement, and any value
of the wrong type or out of range (`check_config`), so a bad model fails at load time, never with a
shape error or a traceback later.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence, Union

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
    except RecursionError:  # json's decoder recurses once per nesting level
        raise ModelLoadError(f"{path}: not a usable JSON config (nested too deeply)") from None
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
        cfg = cls(**kwargs)
    except TypeError as e:
        raise ModelLoadError(f"{source}: incomplete config ({e})") from None
    return check_config(cfg, source, raw)


# ------------------------------------------------------------------------------------- value checks
class _Rule(NamedTuple):
    test: Callable[[Any], bool]
    wants: str  # completes "must be ..."


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _ints(v: Any) -> bool:
    return isinstance(v, (tuple, list)) and len(v) > 0 and all(_is_int(x) and x >= 1 for x in v)


_POSITIVE_INT = _Rule(lambda v: _is_int(v) and v >= 1, "an integer >= 1")
_NON_NEGATIVE_INT = _Rule(lambda v: _is_int(v) and v >= 0, "an integer >= 0")
_NUMBER = _Rule(_is_number, "a finite number")
_POSITIVE_NUMBER = _Rule(lambda v: _is_number(v) and v > 0, "a finite number > 0")
_BOOL = _Rule(lambda v: isinstance(v, bool), "true or false")
_TEXT = _Rule(lambda v: isinstance(v, str), "a string")
_CHANNELS = _Rule(_ints, "a non-empty list of integers >= 1")
_HEADS = _Rule(lambda v: (_is_int(v) and v >= 1) or _ints(v), "an integer >= 1 or a list of them")
_OPTIONAL_POSITIVE_INT = _Rule(lambda v: v is None or _POSITIVE_INT.test(v), "null or an integer >= 1")
_OPTIONAL_HEADS = _Rule(lambda v: v is None or _HEADS.test(v), "null, an integer >= 1 or a list of them")
_BLOCK_TYPES = _Rule(lambda v: isinstance(v, (tuple, list)) and len(v) > 0 and all(isinstance(x, str) for x in v),
                    "a non-empty list of block type names")


def _shown(value: Any, limit: int = 80) -> str:
    """The value as the JSON file lists it (the dataclass holds lists as tuples), cut to `limit` characters."""
    text = repr(list(value) if isinstance(value, tuple) else value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _invalid(source: str, key: str, value: Any, wants: str) -> ModelLoadError:
    return ModelLoadError(f"{source}: invalid config value {key}={_shown(value)}: must be {wants}")


def check_config(cfg, source: Union[str, Path], raw: Optional[Mapping[str, Any]] = None):
    """`cfg` (any of the configs here) with every field of the type and range the modules need, and the
    fields consistent with each other; else a ModelLoadError naming `source`, the key and the value
    (as `raw`, the file's dict, holds it when given). Returns `cfg`."""
    raw = {} if raw is None else raw
    rules = _RULES[type(cfg)]
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if not rules[f.name].test(value):
            raise _invalid(str(source), f.name, raw.get(f.name, value), rules[f.name].wants)
    _CONSISTENCY[type(cfg)](cfg, str(source))
    return cfg


def _check_groups(cfg, source: str) -> None:
    """GroupNorm splits every block's channels into norm_num_groups groups."""
    for channels in cfg.block_out_channels:
        if channels % cfg.norm_num_groups:
            raise ModelLoadError(f"{source}: invalid config value norm_num_groups={cfg.norm_num_groups}: "
                                 f"must divide every block_out_channels entry {list(cfg.block_out_channels)}")


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
    projection_dim: int = 768  # the width of CLIPTextModelWithProjection's text_embeds (SDXL's second encoder)
    # where the pooled output is read: 2 (configs before transformers#24773) = the highest id's position,
    # else the first position of this id
    eos_token_id: int = 49407


_CLIP_REQUIRED = {"hidden_act": ("quick_gelu", "gelu")}
_CLIP_RULES = {
    "vocab_size": _POSITIVE_INT, "hidden_size": _POSITIVE_INT, "intermediate_size": _POSITIVE_INT,
    "num_hidden_layers": _POSITIVE_INT, "num_attention_heads": _POSITIVE_INT, "max_position_embeddings": _POSITIVE_INT,
    "hidden_act": _TEXT, "layer_norm_eps": _POSITIVE_NUMBER, "projection_dim": _POSITIVE_INT,
    "eos_token_id": _NON_NEGATIVE_INT,
}


def _check_clip(cfg: CLIPTextConfig, source: str) -> None:
    if cfg.hidden_size % cfg.num_attention_heads:
        raise ModelLoadError(f"{source}: invalid config value num_attention_heads={cfg.num_attention_heads}: "
                             f"must divide hidden_size={cfg.hidden_size}")


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
    # decode (and encode) in float32 even when the model runs in float16: SDXL's VAE overflows fp16; diffusers'
    # default, honoured by SDXL pipelines as diffusers' are (the fp16-fix VAE's config sets it false)
    force_upcast: bool = True

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


_VAE_RULES = {
    "in_channels": _POSITIVE_INT, "out_channels": _POSITIVE_INT, "block_out_channels": _CHANNELS,
    "layers_per_block": _POSITIVE_INT, "latent_channels": _POSITIVE_INT, "norm_num_groups": _POSITIVE_INT,
    "sample_size": _POSITIVE_INT, "scaling_factor": _POSITIVE_NUMBER, "use_quant_conv": _BOOL,
    "use_post_quant_conv": _BOOL, "mid_block_add_attention": _BOOL, "force_upcast": _BOOL,
}


def _check_vae(cfg: VAEConfig, source: str) -> None:
    _check_groups(cfg, source)


def vae_config(raw: Mapping[str, Any], source: str = "vae/config.json") -> VAEConfig:
    _check_supported(raw, _VAE_REQUIRED, source)
    for key, kind in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        blocks = _block_types(raw, key, source)
        for block in blocks:
            if block != kind:
                raise ModelLoadError(f"{source}: unsupported config value {key} entry {block!r} (sdrt supports {kind!r})")
    cfg = _build(VAEConfig, raw, source)
    for key in ("down_block_types", "up_block_types"):
        if key in raw and len(raw[key]) != len(cfg.block_out_channels):
            raise ModelLoadError(f"{source}: {key} and block_out_channels differ in length")
    return cfg


def _block_types(raw: Mapping[str, Any], key: str, source: str) -> Sequence[str]:
    """The block type names under `key`, checked to be a list of names (the dataclass may not keep them)."""
    if key not in raw:
        return ()
    if not _BLOCK_TYPES.test(raw[key]):
        raise _invalid(source, key, raw[key], _BLOCK_TYPES.wants)
    return raw[key]


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
    # SDXL: transformer blocks per attention layer (one number, or one per level); the "text_time" added
    # embedding of the pooled text embeds and the size/crop (or aesthetic score) ids
    transformer_layers_per_block: Union[int, tuple] = 1
    addition_embed_type: Optional[str] = None
    addition_time_embed_dim: Optional[int] = None
    projection_class_embeddings_input_dim: Optional[int] = None

    def transformer_depths(self) -> tuple:
        """Transformer blocks per attention layer for each down block (the up path mirrors it)."""
        d = self.transformer_layers_per_block
        return tuple(d) if isinstance(d, (tuple, list)) else (d,) * len(self.block_out_channels)

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
    "addition_embed_type": (None, "text_time"),
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
    "reverse_transformer_layers_per_block": (None,),
    "attention_type": ("default",),
    "cross_attention_norm": (None,),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1, 1.0),
    "class_embeddings_concat": (False,),
    "mid_block_only_cross_attention": (None, False),
}
_UNET_DOWN = ("CrossAttnDownBlock2D", "DownBlock2D")
_UNET_UP = ("CrossAttnUpBlock2D", "UpBlock2D")


_UNET_RULES = {
    "sample_size": _POSITIVE_INT, "in_channels": _POSITIVE_INT, "out_channels": _POSITIVE_INT,
    "down_block_types": _BLOCK_TYPES, "up_block_types": _BLOCK_TYPES, "block_out_channels": _CHANNELS,
    "layers_per_block": _POSITIVE_INT, "norm_num_groups": _POSITIVE_INT, "norm_eps": _POSITIVE_NUMBER,
    "cross_attention_dim": _POSITIVE_INT, "attention_head_dim": _HEADS, "num_attention_heads": _OPTIONAL_HEADS,
    "use_linear_projection": _BOOL, "upcast_attention": _BOOL, "flip_sin_to_cos": _BOOL, "freq_shift": _NUMBER,
    "downsample_padding": _NON_NEGATIVE_INT, "mid_block_scale_factor": _NUMBER,
    "transformer_layers_per_block": _HEADS,
    "addition_embed_type": _Rule(lambda v: v in (None, "text_time"), "null or 'text_time'"),
    "addition_time_embed_dim": _OPTIONAL_POSITIVE_INT, "projection_class_embeddings_input_dim": _OPTIONAL_POSITIVE_INT,
}


def _check_unet(cfg: UNetConfig, source: str) -> None:
    n = len(cfg.block_out_channels)
    if len(cfg.down_block_types) != n or len(cfg.up_block_types) != n or len(cfg.heads()) != n:
        raise ModelLoadError(f"{source}: block types, block_out_channels and attention heads differ in length")
    if len(cfg.transformer_depths()) != n:
        raise ModelLoadError(f"{source}: transformer_layers_per_block and block_out_channels differ in length")
    if cfg.addition_embed_type == "text_time" and None in (cfg.addition_time_embed_dim,
                                                           cfg.projection_class_embeddings_input_dim):
        raise ModelLoadError(f"{source}: addition_embed_type='text_time' needs addition_time_embed_dim and "
                             f"projection_class_embeddings_input_dim")
    _check_groups(cfg, source)
    key = "attention_head_dim" if cfg.num_attention_heads is None else "num_attention_heads"
    for channels, heads in zip(cfg.block_out_channels, cfg.heads()):
        if channels % heads:
            raise ModelLoadError(f"{source}: invalid config value {key}={_shown(getattr(cfg, key))}: "
                                 f"heads must divide block_out_channels {list(cfg.block_out_channels)} block by block")


def unet_config(raw: Mapping[str, Any], source: str = "unet/config.json") -> UNetConfig:
    _check_supported(raw, _UNET_REQUIRED, source)
    for key, kinds in (("down_block_types", _UNET_DOWN), ("up_block_types", _UNET_UP)):
        for block in _block_types(raw, key, source):
            if block not in kinds:
                raise ModelLoadError(f"{source}: unsupported config value {key} entry {block!r} "
                                     f"(sdrt supports {', '.join(map(repr, kinds))})")
    for key in ("layers_per_block", "cross_attention_dim"):
        if isinstance(raw.get(key), list):
            raise ModelLoadError(f"{source}: unsupported config value {key}={raw[key]!r} (sdrt supports a single int)")
    return _build(UNetConfig, raw, source)


# config class -> its per-field rules and its consistency check (every field has a rule: see check_config)
_RULES = {CLIPTextConfig: _CLIP_RULES, VAEConfig: _VAE_RULES, UNetConfig: _UNET_RULES}
_CONSISTENCY = {CLIPTextConfig: _check_clip, VAEConfig: _check_vae, UNetConfig: _check_unet}

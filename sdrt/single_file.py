"""Single-file original checkpoints (CompVis / Stability layout) -> our modules.

One key table, written as prefix templates from our (diffusers) names to the original names, with
leaf renames per block kind and the few tensors that need reshaping. The architecture is inferred
from tensor shapes, so no YAML config is needed.

The prediction type is not in the shapes: an SD 2.x 768-v file and a 512-base file are identical but for
their values. `infer_prediction_type` reads what the file and its surroundings say, in this order: a
`.yaml` of the same name beside it (AUTOMATIC1111's convention; LDM's `parameterization: "v"`, absent
= epsilon), the safetensors header (`modelspec.prediction_type` / `modelspec.architecture`, Stability's
model spec), a `v_pred` marker tensor (trainers' convention), a `.ckpt`'s `global_step` of 875000 (the SD
2.0 512-base release; diffusers' rule), and the architecture (SD 1.x and the 9-channel SD 2.x inpainting
model are epsilon). What remains, a plain SD 2.x file, is assumed 768-v (v-prediction), as diffusers
does; that guess is flagged so the loader can warn.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional

import torch

from sdrt.config import CLIPTextConfig, UNetConfig, VAEConfig
from sdrt.errors import ModelLoadError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."      # SD 1.x: OpenAI CLIP in transformers layout
OPENCLIP_PREFIX = "cond_stage_model.model."        # SD 2.x: OpenCLIP ViT-H
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."  # SDXL base: CLIP ViT-L (transformers layout)
SDXL_OPENCLIP_PREFIX = "conditioner.embedders.1.model."    # SDXL base: OpenCLIP bigG (the refiner's is embedders.0)
SDXL_REFINER_OPENCLIP_PREFIX = "conditioner.embedders.0.model."
SDXL_VAE_SCALING = 0.13025  # SDXL's VAE latent scale (SD 1.x/2.x: 0.18215, VAEConfig's default)

# leaf renames inside a block: our name -> original name
_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_OPENCLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                   "self_attn.out_proj": "attn.out_proj"}

Transform = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Rule:
    ours: str                       # our key prefix
    theirs: str                     # the original key prefix
    leaves: Optional[Mapping[str, str]] = None  # renames of the first name(s) after the prefix

    def source_key(self, key: str) -> str:
        rest = key[len(self.ours):]
        for ours, theirs in (self.leaves or {}).items():
            if rest.startswith(ours + "."):
                return self.theirs + theirs + rest[len(ours):]
        return self.theirs + rest


# --------------------------------------------------------------------------------------- the key table
def unet_rules(cfg: UNetConfig) -> list[Rule]:
    per = cfg.layers_per_block + 1  # input/output_blocks entries per level
    rules = [Rule("time_embedding.linear_1.", "time_embed.0."), Rule("time_embedding.linear_2.", "time_embed.2."),
             Rule("conv_in.", "input_blocks.0.0."), Rule("conv_norm_out.", "out.0."), Rule("conv_out.", "out.2."),
             Rule("mid_block.resnets.0.", "middle_block.0.", _UNET_RESNET),
             Rule("mid_block.attentions.0.", "middle_block.1."),
             Rule("mid_block.resnets.1.", "middle_block.2.", _UNET_RESNET),
             Rule("add_embedding.linear_1.", "label_emb.0.0."), Rule("add_embedding.linear_2.", "label_emb.0.2.")]
    for i in range(len(cfg.block_out_channels)):
        for j in range(cfg.layers_per_block):
            k = 1 + i * per + j
            rules += [Rule(f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{k}.0.", _UNET_RESNET),
                      Rule(f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{k}.1.")]
        rules.append(Rule(f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(i + 1) * per}.0.op."))
        for j in range(per):
            rules += [Rule(f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{i * per + j}.0.", _UNET_RESNET),
                      Rule(f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{i * per + j}.1.")]
        upsampler_slot = 2 if cfg.up_block_types[i] == "CrossAttnUpBlock2D" else 1
        rules.append(Rule(f"up_blocks.{i}.upsamplers.0.conv.", f"output_blocks.{i * per + per - 1}.{upsampler_slot}.conv."))
    return rules


def vae_rules(cfg: VAEConfig) -> list[Rule]:
    n = len(cfg.block_out_channels)
    rules = [Rule("quant_conv.", "quant_conv."), Rule("post_quant_conv.", "post_quant_conv.")]
    for part in ("encoder", "decoder"):
        rules += [Rule(f"{part}.conv_in.", f"{part}.conv_in."), Rule(f"{part}.conv_out.", f"{part}.conv_out."),
                  Rule(f"{part}.conv_norm_out.", f"{part}.norm_out."),
                  Rule(f"{part}.mid_block.resnets.0.", f"{part}.mid.block_1.", _VAE_RESNET),
                  Rule(f"{part}.mid_block.resnets.1.", f"{part}.mid.block_2.", _VAE_RESNET),
                  Rule(f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.", _VAE_ATTENTION)]
    for i in range(n):
        rules += [Rule(f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.", _VAE_RESNET)
                  for j in range(cfg.layers_per_block)]
        # the original decoder counts its levels from the bottom
        rules += [Rule(f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{n - 1 - i}.block.{j}.", _VAE_RESNET)
                  for j in range(cfg.layers_per_block + 1)]
        rules += [Rule(f"encoder.down_blocks.{i}.downsamplers.0.conv.", f"encoder.down.{i}.downsample.conv."),
                  Rule(f"decoder.up_blocks.{i}.upsamplers.0.conv.", f"decoder.up.{n - 1 - i}.upsample.conv.")]
    return rules


def clip_rules(cfg: CLIPTextConfig, openclip: bool) -> list[Rule]:
    if not openclip:
        return [Rule("text_model.", "text_model.")]
    rules = [Rule("text_model.embeddings.token_embedding.", "token_embedding."),
             Rule("text_model.final_layer_norm.", "ln_final.")]
    rules += [Rule(f"text_model.encoder.layers.{i}.", f"transformer.resblocks.{i}.", _OPENCLIP_LAYER)
              for i in range(cfg.num_hidden_layers)]
    return rules


def _find_rule(rules: list[Rule], key: str) -> Optional[Rule]:
    best = None
    for rule in rules:
        if key.startswith(rule.ours) and (best is None or len(rule.ours) > len(best.ours)):
            best = rule
    return best


def convert(expected_keys: list[str], tensors: Mapping[str, torch.Tensor], prefix: str, rules: list[Rule],
            source: str) -> dict[str, torch.Tensor]:
    """Our state dict, read through `rules` from `tensors` (keys under `prefix`)."""
    out = {}
    openclip = prefix in (OPENCLIP_PREFIX, SDXL_OPENCLIP_PREFIX, SDXL_REFINER_OPENCLIP_PREFIX)
    for key in expected_keys:
        special = _openclip_special(key, tensors, prefix) if openclip else None
        if special is not None:
            out[key] = special
            continue
        rule = _find_rule(rules, key)
        if rule is None:
            raise ModelLoadError(f"{source}: no single-file mapping for tensor {key!r}")
        theirs = prefix + rule.source_key(key)
        if theirs not in tensors:
            raise ModelLoadError(f"{source}: missing tensor {theirs!r}")
        t = tensors[theirs]
        if prefix == VAE_PREFIX and ".mid.attn_1." in theirs and t.dim() == 4:
            t = t.reshape(t.shape[0], t.shape[1])  # the original stores these projections as 1x1 convs
        out[key] = t
    return out


def _openclip_special(key: str, tensors: Mapping[str, torch.Tensor], prefix: str) -> Optional[torch.Tensor]:
    """OpenCLIP tensors with no one-to-one counterpart: the fused q/k/v projection, the positions and SDXL's
    text projection (OpenCLIP multiplies x @ P [width, projection]; ours is a Linear, weight P^T)."""
    if key == "text_model.embeddings.position_embedding.weight":
        return _get(tensors, prefix + "positional_embedding")
    if key == "text_projection.weight":
        return _get(tensors, prefix + "text_projection").T.contiguous()
    m = re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", key)
    if m:
        layer, which, kind = m.groups()
        fused = _get(tensors, f"{prefix}transformer.resblocks.{layer}.attn.in_proj_{kind}")
        return fused.chunk(3, dim=0)["qkv".index(which)]
    return None


def _get(tensors: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in tensors:
        raise ModelLoadError(f"missing tensor {key!r}")
    return tensors[key]


# ------------------------------------------------------------------------- architecture from shapes
def _count(tensors: Mapping[str, torch.Tensor], pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in tensors if (m := rx.match(k))})


def infer_unet_config(t: Mapping[str, torch.Tensor]) -> UNetConfig:
    p = UNET_PREFIX
    conv_in = _get(t, p + "input_blocks.0.0.weight")
    levels = _count(t, re.escape(p) + r"input_blocks\.(\d+)\.0\.op\.weight") + 1
    per = _count(t, re.escape(p) + r"input_blocks\.(\d+)\.") // levels
    layers = per - 1
    channels = tuple(_get(t, f"{p}input_blocks.{1 + i * per}.0.out_layers.3.weight").shape[0] for i in range(levels))
    has_attn = [f"{p}input_blocks.{1 + i * per}.1.proj_in.weight" in t for i in range(levels)]
    proj_in = _get(t, f"{p}middle_block.1.proj_in.weight")
    context_dim = _get(t, f"{p}middle_block.1.transformer_blocks.0.attn2.to_k.weight").shape[1]
    if is_sdxl(t):
        return _sdxl_unet_config(t, conv_in, channels, has_attn, layers, per, context_dim)
    # the text tower decides (OpenCLIP = SD 2.x); the context width alone would miss narrower SD 2.x-style models
    sd2 = context_dim == 1024 or any(k.startswith(OPENCLIP_PREFIX) for k in t)
    # SD 1.x uses 8 heads everywhere; SD 2.x uses 64-wide heads (diffusers' attention_head_dim list)
    heads = tuple(c // 64 for c in channels) if sd2 else 8
    return UNetConfig(
        in_channels=conv_in.shape[1], out_channels=_get(t, p + "out.2.weight").shape[0],
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in has_attn),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(has_attn)),
        block_out_channels=channels, layers_per_block=layers, cross_attention_dim=context_dim,
        attention_head_dim=heads, use_linear_projection=proj_in.dim() == 2, upcast_attention=sd2)


def _sdxl_unet_config(t, conv_in, channels, has_attn, layers, per, context_dim) -> UNetConfig:
    """SDXL: 64-wide heads, transformer depth per level (1 where a level has no attention), the "text_time"
    added embedding: pooled projection + 6 size/crop ids (the base) or 5 with the aesthetic score (the refiner,
    which has no CLIP ViT-L), each id addition_time_embed_dim wide."""
    p = UNET_PREFIX
    def depth(block: str) -> int:
        return _count(t, re.escape(f"{p}{block}.1.transformer_blocks.") + r"(\d+)\.")

    depths = tuple(depth(f"input_blocks.{1 + i * per}") if a else 1 for i, a in enumerate(has_attn))
    if depth("middle_block") != depths[-1]:
        raise ModelLoadError("SDXL single file: the middle block's transformer depth differs from the last level's")
    added_in = _get(t, p + "label_emb.0.0.weight").shape[1]
    bigg = SDXL_OPENCLIP_PREFIX if any(k.startswith(SDXL_CLIP_PREFIX) for k in t) else SDXL_REFINER_OPENCLIP_PREFIX
    projection = _get(t, bigg + "text_projection").shape[1]
    ids = 6 if bigg == SDXL_OPENCLIP_PREFIX else 5
    if (added_in - projection) % ids or added_in <= projection:
        raise ModelLoadError(f"SDXL single file: label_emb takes {added_in} inputs, not the {projection}-wide "
                             f"pooled projection plus {ids} equal time ids")
    return UNetConfig(
        in_channels=conv_in.shape[1], out_channels=_get(t, p + "out.2.weight").shape[0],
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in has_attn),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(has_attn)),
        block_out_channels=channels, layers_per_block=layers, cross_attention_dim=context_dim,
        attention_head_dim=tuple(max(1, c // 64) for c in channels),
        use_linear_projection=_get(t, f"{p}middle_block.1.proj_in.weight").dim() == 2,
        transformer_layers_per_block=depths, addition_embed_type="text_time",
        addition_time_embed_dim=(added_in - projection) // ids, projection_class_embeddings_input_dim=added_in)


def infer_vae_config(t: Mapping[str, torch.Tensor]) -> VAEConfig:
    p = VAE_PREFIX
    levels = _count(t, re.escape(p) + r"encoder\.down\.(\d+)\.")
    return VAEConfig(
        in_channels=_get(t, p + "encoder.conv_in.weight").shape[1],
        out_channels=_get(t, p + "decoder.conv_out.weight").shape[0],
        block_out_channels=tuple(_get(t, f"{p}encoder.down.{i}.block.0.conv1.weight").shape[0] for i in range(levels)),
        layers_per_block=_count(t, re.escape(p) + r"encoder\.down\.0\.block\.(\d+)\."),
        latent_channels=_get(t, p + "decoder.conv_in.weight").shape[1],
        scaling_factor=SDXL_VAE_SCALING if is_sdxl(t) else VAEConfig.scaling_factor,
        mid_block_add_attention=f"{p}encoder.mid.attn_1.q.weight" in t)


def infer_clip_config(t: Mapping[str, torch.Tensor]) -> tuple[CLIPTextConfig, bool]:
    """(config, is_openclip). OpenCLIP towers lose their last layer: SD 2.x conditions on the penultimate."""
    if any(k.startswith(OPENCLIP_PREFIX) for k in t):
        return _openclip_config(t, OPENCLIP_PREFIX, dropped_layers=1), True
    return _clip_config(t, CLIP_PREFIX), False


def _openclip_config(t: Mapping[str, torch.Tensor], p: str, dropped_layers: int) -> CLIPTextConfig:
    tok = _get(t, p + "token_embedding.weight")
    layers = _count(t, re.escape(p) + r"transformer\.resblocks\.(\d+)\.") - dropped_layers
    projection = t.get(p + "text_projection")
    return CLIPTextConfig(vocab_size=tok.shape[0], hidden_size=tok.shape[1],
                          intermediate_size=_get(t, p + "transformer.resblocks.0.mlp.c_fc.weight").shape[0],
                          num_hidden_layers=layers, num_attention_heads=max(1, tok.shape[1] // 64),
                          max_position_embeddings=_get(t, p + "positional_embedding").shape[0], hidden_act="gelu",
                          projection_dim=tok.shape[1] if projection is None else projection.shape[1])


def _clip_config(t: Mapping[str, torch.Tensor], prefix: str) -> CLIPTextConfig:
    p = prefix + "text_model."
    tok = _get(t, p + "embeddings.token_embedding.weight")
    return CLIPTextConfig(vocab_size=tok.shape[0], hidden_size=tok.shape[1],
                          intermediate_size=_get(t, p + "encoder.layers.0.mlp.fc1.weight").shape[0],
                          num_hidden_layers=_count(t, re.escape(p) + r"encoder\.layers\.(\d+)\."),
                          num_attention_heads=max(1, tok.shape[1] // 64),
                          max_position_embeddings=_get(t, p + "embeddings.position_embedding.weight").shape[0],
                          hidden_act="quick_gelu")


def sdxl_text_configs(t: Mapping[str, torch.Tensor]) -> tuple[Optional[CLIPTextConfig], CLIPTextConfig, str]:
    """SDXL's towers: (CLIP ViT-L config or None for the refiner, OpenCLIP bigG config, bigG's prefix). Both are
    kept whole (SDXL reads the penultimate layer and, from bigG, the final one too)."""
    first = _clip_config(t, SDXL_CLIP_PREFIX) if any(k.startswith(SDXL_CLIP_PREFIX) for k in t) else None
    prefix = SDXL_OPENCLIP_PREFIX if first is not None else SDXL_REFINER_OPENCLIP_PREFIX
    return first, _openclip_config(t, prefix, dropped_layers=0), prefix


def is_sdxl(tensors: Mapping[str, torch.Tensor]) -> bool:
    return any(k.startswith("conditioner.embedders.") for k in tensors)


def is_single_file(tensors: Mapping[str, torch.Tensor]) -> bool:
    return any(k.startswith(UNET_PREFIX) for k in tensors)


def normalize_clip_keys(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Older SD 1.x files store the CLIP tower without transformers' `text_model.` level."""
    old = CLIP_PREFIX + "embeddings."
    if any(k.startswith(old) for k in tensors):
        return {(CLIP_PREFIX + "text_model." + k[len(CLIP_PREFIX):] if k.startswith(CLIP_PREFIX) else k): v
                for k, v in tensors.items()}
    return tensors


# ---------------------------------------------------------------------------------- prediction type
_SD20_BASE_GLOBAL_STEP = 875000  # diffusers' single-file rule for the SD 2.0 512-base (epsilon) release
_MODELSPEC_PREDICTION = {"v": "v_prediction", "v_prediction": "v_prediction", "v-prediction": "v_prediction",
                         "epsilon": "epsilon", "eps": "epsilon"}
_MODELSPEC_ARCHITECTURE = {"stable-diffusion-v2-768-v": "v_prediction", "stable-diffusion-v2-512": "epsilon"}


@dataclass(frozen=True)
class PredictionType:
    value: str      # "epsilon" | "v_prediction"
    evidence: str   # what decided it, for the log
    guessed: bool   # True when nothing in or beside the file said: the loader warns


def infer_prediction_type(path: Path, tensors: Mapping[str, torch.Tensor], sd2: bool,
                          inpainting: bool) -> PredictionType:
    """The single file's prediction type from the evidence listed in the module docstring."""
    yaml = path.with_suffix(".yaml")
    if yaml.is_file():
        m = re.search(r"^\s*parameterization:\s*[\"']?(\w+)", yaml.read_text(encoding="utf-8", errors="replace"),
                      re.MULTILINE)
        found = m.group(1) if m else "eps"
        return PredictionType("v_prediction" if found == "v" else "epsilon", f"{yaml.name} (parameterization "
                              f"{found!r})", False)
    metadata = _safetensors_metadata(path)
    spec = str(metadata.get("modelspec.prediction_type", "")).lower()
    if spec in _MODELSPEC_PREDICTION:
        return PredictionType(_MODELSPEC_PREDICTION[spec], f"modelspec.prediction_type={spec!r}", False)
    arch = str(metadata.get("modelspec.architecture", "")).lower()
    if arch in _MODELSPEC_ARCHITECTURE:
        return PredictionType(_MODELSPEC_ARCHITECTURE[arch], f"modelspec.architecture={arch!r}", False)
    if "v_pred" in tensors:
        return PredictionType("v_prediction", "a v_pred marker tensor", False)
    if not sd2:
        return PredictionType("epsilon", "SD 1.x", False)
    if inpainting:
        return PredictionType("epsilon", "SD 2.x 9-channel inpainting", False)
    if _ckpt_global_step(path) == _SD20_BASE_GLOBAL_STEP:
        return PredictionType("epsilon", f"global_step {_SD20_BASE_GLOBAL_STEP} (SD 2.0 512-base)", False)
    return PredictionType("v_prediction", "nothing in or beside the file says; assumed SD 2.x 768-v", True)


def native_sample_size(sd2: bool, prediction_type: str) -> int:
    """Latent size of the native resolution: SD 2.x v models are 768x768, every other SD release 512x512."""
    return 96 if sd2 and prediction_type == "v_prediction" else 64


def _safetensors_metadata(path: Path) -> dict:
    if path.suffix != ".safetensors":
        return {}
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:  # reads the header only
        return f.metadata() or {}


def _ckpt_global_step(path: Path) -> Optional[int]:
    """An original .ckpt's training step (beside its state_dict); None for other files."""
    if path.suffix != ".ckpt":
        return None
    data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # memory-mapped: no tensor is read
    step = data.get("global_step") if isinstance(data, Mapping) else None
    return int(step) if isinstance(step, int) or (torch.is_tensor(step) and step.numel() == 1) else None

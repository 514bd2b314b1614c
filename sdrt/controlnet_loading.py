"""Load ControlNets: diffusers folders (config.json + weights) and original single files (`control_model.*`
keys, or the same keys with no prefix), checked against the U-Net they will steer."""
from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

import torch

from sdrt import single_file as sf
from sdrt.config import UNetConfig, check_config, read_json, unet_config
from sdrt.errors import InvalidInputError, ModelLoadError
from sdrt.models.controlnet import ControlNet, ControlNetConfig
from sdrt.weights import assign_checked, build_module, find_weights_file, read_tensors

PathArg = Union[str, os.PathLike]
CONTROL_PREFIX = "control_model."
_CHANNEL_ORDERS = ("rgb", "bgr")


def controlnet_config(raw: Mapping[str, Any], source: str = "controlnet/config.json") -> ControlNetConfig:
    """A diffusers ControlNetModel config.json -> ControlNetConfig (ModelLoadError on what sdrt does not model)."""
    down = raw.get("down_block_types", UNetConfig.down_block_types)
    # the encoder is read as a U-Net config; the up path it does not have is set to the mirror of the down path
    up = [kind.replace("Down", "Up") for kind in reversed(down)] if isinstance(down, (list, tuple)) else down
    ucfg = unet_config(dict(raw, up_block_types=up, out_channels=4), source)
    order = raw.get("controlnet_conditioning_channel_order", "rgb")
    if order not in _CHANNEL_ORDERS:
        raise ModelLoadError(f"{source}: unsupported config value controlnet_conditioning_channel_order={order!r} "
                             f"(sdrt supports 'rgb', 'bgr')")
    tower = raw.get("conditioning_embedding_out_channels", ControlNetConfig.conditioning_embedding_out_channels)
    channels = raw.get("conditioning_channels", 3)
    pool = raw.get("global_pool_conditions", False)
    if not (isinstance(tower, (list, tuple)) and tower and all(isinstance(c, int) and c >= 1 for c in tower)):
        raise ModelLoadError(f"{source}: invalid config value conditioning_embedding_out_channels={tower!r}: "
                             f"must be a non-empty list of integers >= 1")
    if not (isinstance(channels, int) and not isinstance(channels, bool) and channels >= 1):
        raise ModelLoadError(f"{source}: invalid config value conditioning_channels={channels!r}: "
                             f"must be an integer >= 1")
    if not isinstance(pool, bool):
        raise ModelLoadError(f"{source}: invalid config value global_pool_conditions={pool!r}: must be true or false")
    return ControlNetConfig(ucfg, channels, tuple(tower), pool, order)


def load_controlnet(path: PathArg, dtype: torch.dtype = torch.float32,
                    device: Union[str, torch.device] = "cpu") -> ControlNet:
    """A diffusers ControlNet folder or an original single-file checkpoint."""
    path = Path(path).expanduser()
    if path.is_dir():
        cfg = controlnet_config(read_json(path / "config.json"), str(path / "config.json"))
        weights = find_weights_file(path, prefer_fp16=dtype == torch.float16)
        return build_module(lambda: ControlNet(cfg), read_tensors(weights), weights, dtype, device)
    if path.is_file():
        return _load_single_file(path, dtype, device)
    raise ModelLoadError(f"controlnet not found: {path} (expected a diffusers ControlNet folder or a single-file "
                         f"checkpoint)")


def load_controlnets(paths: Union[PathArg, Sequence[PathArg]], dtype: torch.dtype, device: Union[str, torch.device],
                     unet_cfg: UNetConfig, vae_factor: int, model: str) -> list[ControlNet]:
    """`paths`: one path or a non-empty list of them; each ControlNet is checked to fit `unet_cfg` and a VAE
    of `vae_factor` pixels per latent."""
    items = list(paths) if isinstance(paths, (list, tuple)) else [paths]
    if not items or not all(isinstance(p, (str, os.PathLike)) for p in items):
        raise InvalidInputError(f"controlnet must be a path or a non-empty list of paths, got {paths!r:.120}")
    nets = []
    for p in items:
        net = load_controlnet(p, dtype, device)
        check_fits(net.config, unet_cfg, str(p), model)
        if net.config.downsample_factor != vae_factor:
            raise InvalidInputError(f"controlnet {p} was made for another base model: its control images have "
                                    f"{net.config.downsample_factor} pixels per latent, the model {model}'s VAE "
                                    f"{vae_factor}")
        nets.append(net)
    return nets


def check_fits(cfg: ControlNetConfig, unet_cfg: UNetConfig, name: str, model: str) -> None:
    """The ControlNet's residuals must match the U-Net's skips and its cross-attention width."""
    for key in ("block_out_channels", "layers_per_block", "cross_attention_dim", "addition_embed_type"):
        mine, theirs = getattr(cfg.unet, key), getattr(unet_cfg, key)
        if mine != theirs:
            raise InvalidInputError(f"controlnet {name} was made for another base model: its {key} is "
                                    f"{_listed(mine)}, the model {model}'s is {_listed(theirs)}")


def _listed(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


# ------------------------------------------------------------------------------------------ single files
def _load_single_file(path: Path, dtype: torch.dtype, device: Union[str, torch.device]) -> ControlNet:
    tensors = read_tensors(path)
    prefix = CONTROL_PREFIX if any(k.startswith(CONTROL_PREFIX) for k in tensors) else ""
    if prefix + "input_hint_block.0.weight" not in tensors:
        raise ModelLoadError(f"{path}: not a ControlNet checkpoint (no '{CONTROL_PREFIX}input_hint_block.*' tensors)")
    cfg = infer_controlnet_config(tensors, prefix)
    check_config(cfg.unet, path)
    with torch.device("meta"):
        module = ControlNet(cfg)
    sd = sf.convert(list(module.state_dict()), tensors, prefix, controlnet_rules(cfg), str(path))
    return assign_checked(module, sd, path, dtype, device)


def infer_controlnet_config(tensors: Mapping[str, torch.Tensor], prefix: str) -> ControlNetConfig:
    """The architecture from tensor shapes: the encoder as `sf.infer_unet_config` reads a U-Net's, plus the
    hint tower's widths (its convs sit at even indices of `input_hint_block`, the last one is conv_out)."""
    as_unet = {sf.UNET_PREFIX + k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    # the encoder has no output layer; give the U-Net reader the 4 output channels it looks for
    as_unet[sf.UNET_PREFIX + "out.2.weight"] = torch.empty(4, 0)
    ucfg = sf.infer_unet_config(as_unet)
    hint = sorted(int(m.group(1)) for k in tensors
                  if (m := re.fullmatch(re.escape(prefix) + r"input_hint_block\.(\d+)\.weight", k)))
    widths = [tensors[f"{prefix}input_hint_block.{i}.weight"].shape[0] for i in hint[:-1]]
    tower = (widths[0],) + tuple(widths[2::2])  # conv_in, then each strided conv's width
    channels = tensors[f"{prefix}input_hint_block.0.weight"].shape[1]
    return ControlNetConfig(dataclasses.replace(ucfg, sample_size=64), channels, tower)


def controlnet_rules(cfg: ControlNetConfig) -> list[sf.Rule]:
    """Our keys -> the original's: the encoder as in a U-Net file, plus the hint tower and the zero convs."""
    n_hint = 2 * (len(cfg.conditioning_embedding_out_channels) - 1)
    rules = [rule for rule in sf.unet_rules(cfg.unet) if not rule.ours.startswith(("up_blocks.", "conv_norm_out.",
                                                                                   "conv_out."))]
    rules += [sf.Rule("controlnet_cond_embedding.conv_in.", "input_hint_block.0."),
              sf.Rule("controlnet_cond_embedding.conv_out.", f"input_hint_block.{2 * (n_hint + 1)}."),
              sf.Rule("controlnet_mid_block.", "middle_block_out.0.")]
    rules += [sf.Rule(f"controlnet_cond_embedding.blocks.{j}.", f"input_hint_block.{2 * (j + 1)}.")
              for j in range(n_hint)]
    n_skips = len(cfg.unet.block_out_channels) * (cfg.unet.layers_per_block + 1)  # conv_in's + each level's
    rules += [sf.Rule(f"controlnet_down_blocks.{j}.", f"zero_convs.{j}.0.") for j in range(n_skips)]
    return rules

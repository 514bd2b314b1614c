"""SDXL variants: which run as SDXL, and which sdrt refuses by name, in one line, before any weight is read.

Run as SDXL (their configs are SDXL's; see the README's supported-models table):
- SDXL Turbo: an SDXL base whose scheduler config is Euler ancestral with timestep_spacing "trailing" and
  whose U-Net says 512x512; call it as diffusers does: `scheduler=None` (the model's own), 1-4 steps,
  `guidance_scale=0.0` (no CFG: any scale <= 1 runs the conditional batch alone).
- SDXL Lightning: the SDXL base with Lightning's U-Net (or a whole single file); its recipe is Euler with
  timestep_spacing "trailing" and guidance 0: `pipe.scheduler_config["timestep_spacing"] = "trailing"`, then
  `pipe(..., scheduler="euler", steps=4, guidance_scale=0.0)`.
- SDXL inpainting 0.1 (9-channel U-Net), the refiner, and single files that mark v-prediction (`v_pred`,
  with `ztsnr`: zero terminal SNR) or say it in their model spec (see `sdrt.single_file.infer_prediction_type`).

Refused:
- EDM schedulers (Playground v2.5, CosXL): `EDMDPMSolverMultistepScheduler`, `EDMEulerScheduler`, Euler with
  timestep_type "continuous"; single files with `edm_vpred.*` markers. Their sigma-space preconditioning is not
  one of sdrt's schedulers, and running them as DDPM-style schedules would give wrong pictures.
- Playground v2.5's VAE scaling: per-channel `latents_mean` / `latents_std` in the VAE config (single files:
  `edm_mean` / `edm_std` tensors).
- U-Nets taking an image's latents beside the noise (`in_channels` 8: SDXL InstructPix2Pix, CosXL Edit),
  and pipelines of such models (`StableDiffusionXLInstructPix2PixPipeline`).
- Distilled U-Nets with per-layer transformer depths (SSD-1B, Segmind Vega: `transformer_layers_per_block`
  holding lists, `reverse_transformer_layers_per_block`, a middle block without attention).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping

import torch

from sdrt import single_file as sf
from sdrt.config import read_json
from sdrt.errors import ModelLoadError

EDM_SCHEDULERS = ("EDMDPMSolverMultistepScheduler", "EDMEulerScheduler")
EDIT_PIPELINES = {"StableDiffusionXLInstructPix2PixPipeline": "SDXL InstructPix2Pix"}
EDIT = "an InstructPix2Pix-style edit model (SDXL InstructPix2Pix, CosXL Edit): the input image's latents " \
       "beside the noise, with image guidance"
DISTILLED = "a distilled SDXL U-Net with per-layer transformer depths (SSD-1B, Segmind Vega)"
EDM = "an EDM (sigma-space) model (Playground v2.5, CosXL)"


def refuse_pipeline_class(index_path: Path, kind: object) -> None:
    """A model_index.json `_class_name` of an SDXL variant sdrt cannot run -> ModelLoadError naming it."""
    if kind in EDIT_PIPELINES:
        raise ModelLoadError(f"{index_path}: {EDIT_PIPELINES[kind]} ({kind}) is not supported: {EDIT}")


def check_folder(root: Path) -> None:
    """The raw configs of an SDXL folder: refuse the variants of the module docstring by name."""
    scheduler = read_json(root / "scheduler" / "scheduler_config.json")
    _check_scheduler(scheduler, str(root / "scheduler" / "scheduler_config.json"))
    unet_path = root / "unet" / "config.json"
    unet = read_json(unet_path)
    _check_in_channels(unet.get("in_channels", 4), str(unet_path))
    depths = unet.get("transformer_layers_per_block")
    if unet.get("reverse_transformer_layers_per_block") is not None or \
            (isinstance(depths, list) and any(isinstance(d, list) for d in depths)):
        raise ModelLoadError(f"{unet_path}: {DISTILLED} is not supported (transformer_layers_per_block="
                             f"{depths!r}, reverse_transformer_layers_per_block="
                             f"{unet.get('reverse_transformer_layers_per_block')!r})")
    if unet.get("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn":
        raise ModelLoadError(f"{unet_path}: {DISTILLED} is not supported (mid_block_type="
                             f"{unet.get('mid_block_type')!r})")
    vae_path = root / "vae" / "config.json"
    vae = read_json(vae_path)
    if vae.get("latents_mean") is not None or vae.get("latents_std") is not None:
        raise ModelLoadError(f"{vae_path}: Playground v2.5-style VAE scaling (per-channel latents_mean / "
                             f"latents_std) is not supported")


def check_single_file(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    """An SDXL single file: refuse the variants of the module docstring by their markers and shapes."""
    if "edm_mean" in tensors or "edm_std" in tensors:
        raise ModelLoadError(f"{path}: {EDM} is not supported (Playground v2.5's edm_mean / edm_std latent "
                             f"scaling tensors)")
    if any(k.startswith("edm_vpred.") for k in tensors):
        raise ModelLoadError(f"{path}: {EDM} is not supported (edm_vpred.sigma_min / sigma_max markers)")
    conv_in = tensors.get(sf.UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is not None:
        _check_in_channels(conv_in.shape[1], str(path))
    if sf.UNET_PREFIX + "middle_block.1.proj_in.weight" not in tensors:
        raise ModelLoadError(f"{path}: {DISTILLED} is not supported (a middle block without attention)")
    # each attention layer's transformer depth, by its width: SDXL's are equal within a level (the middle block
    # is as deep as the last level), the distilled ones' are not
    pattern = re.compile(re.escape(sf.UNET_PREFIX) + r"((?:input_blocks|output_blocks)\.\d+|middle_block)\.1\."
                         r"transformer_blocks\.(\d+)\.")
    depth: dict[str, int] = {}
    for key in tensors:
        if m := pattern.match(key):
            depth[m.group(1)] = max(depth.get(m.group(1), 0), int(m.group(2)) + 1)
    by_width: dict[int, set] = {}
    for block, d in depth.items():
        proj_in = tensors.get(f"{sf.UNET_PREFIX}{block}.1.proj_in.weight")
        if proj_in is not None:
            by_width.setdefault(proj_in.shape[0], set()).add(d)
    mixed = {w: sorted(d) for w, d in sorted(by_width.items()) if len(d) > 1}
    if mixed:
        raise ModelLoadError(f"{path}: {DISTILLED} is not supported (" + "; ".join(
            f"{w}-wide attention layers {', '.join(map(str, d))} transformer blocks deep" for w, d in mixed.items())
            + ")")


def _check_scheduler(config: Mapping, source: str) -> None:
    kind = config.get("_class_name")
    if kind in EDM_SCHEDULERS:
        raise ModelLoadError(f"{source}: {EDM} is not supported (scheduler {kind})")
    if config.get("timestep_type", "discrete") != "discrete":
        raise ModelLoadError(f"{source}: {EDM} is not supported (timestep_type={config['timestep_type']!r})")


def _check_in_channels(in_channels: object, source: str) -> None:
    if in_channels == 8:
        raise ModelLoadError(f"{source}: {EDIT} is not supported (an 8-channel U-Net)")

"""SDXL single files (Stability's layout) load to the same modules as the diffusers folder, base and refiner.

The file is written here from the tiny SDXL folder: the U-Net and VAE by test_single_file's LDM converters (plus
SDXL's `label_emb`), CLIP ViT-L under `conditioner.embedders.0.transformer.`, OpenCLIP bigG under
`conditioner.embedders.1.model.` (the refiner's: `embedders.0.model.`) with fused in_proj and text_projection
[width, projection]. diffusers' own single-file converters vouch for the file (they map it back to exactly the
folder's tensors); then sdrt's loader must give torch.equal state dicts and configs (sample_size aside) and the
folder's picture.
"""
from __future__ import annotations

import dataclasses
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import sdrt
from sdrt.components import load_components
from sdxl_factories import save_sdxl
from test_single_file import assert_same_tensors, ldm_unet, ldm_vae

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


def _folder_tensors(folder) -> dict:
    out = {name: load_file(str(folder / name / "diffusion_pytorch_model.safetensors")) for name in ("unet", "vae")}
    for name in ("text_encoder", "text_encoder_2"):
        if (folder / name).is_dir():  # transformers 5 may save the tower without its `text_model.` level
            out[name] = {("" if k.startswith(("text_model.", "text_projection.")) else "text_model.") + k: v
                         for k, v in load_file(str(folder / name / "model.safetensors")).items()}
    return out


def _bigg(sd: dict, prefix: str) -> dict:
    """transformers CLIPTextModelWithProjection -> OpenCLIP bigG: fused q/k/v, text_projection as x @ P."""
    layers = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
              "self_attn.out_proj": "attn.out_proj"}
    t = {k.removeprefix("text_model."): v for k, v in sd.items()}
    out = {prefix + "token_embedding.weight": t["embeddings.token_embedding.weight"],
           prefix + "positional_embedding": t["embeddings.position_embedding.weight"],
           prefix + "ln_final.weight": t["final_layer_norm.weight"],
           prefix + "ln_final.bias": t["final_layer_norm.bias"],
           prefix + "text_projection": t["text_projection.weight"].T, prefix + "logit_scale": torch.tensor(4.6052)}
    n = 1 + max(int(m.group(1)) for k in t if (m := re.match(r"encoder\.layers\.(\d+)\.", k)))
    for i in range(n):
        for kind in ("weight", "bias"):
            for ours, theirs in layers.items():
                out[f"{prefix}transformer.resblocks.{i}.{theirs}.{kind}"] = t[f"encoder.layers.{i}.{ours}.{kind}"]
            out[f"{prefix}transformer.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat(
                [t[f"encoder.layers.{i}.self_attn.{x}_proj.{kind}"] for x in "qkv"])
    return out


def _original_layout(folder, pipe) -> tuple[dict, str]:
    """-> (the single file's tensors, bigG's prefix)."""
    tensors = _folder_tensors(folder)
    unet = dict(tensors["unet"])
    added = {f"model.diffusion_model.label_emb.0.{0 if k.startswith('add_embedding.linear_1.') else 2}."
             f"{k.rsplit('.', 1)[1]}": unet.pop(k) for k in [k for k in unet if k.startswith("add_embedding.")]}
    out = {**ldm_unet(unet, pipe.unet.config.layers_per_block), **added,
           **ldm_vae(tensors["vae"], len(pipe.vae.config.block_out_channels))}
    refiner = "text_encoder" not in tensors
    if not refiner:
        out.update({"conditioner.embedders.0.transformer." + k: v for k, v in tensors["text_encoder"].items()})
    prefix = f"conditioner.embedders.{0 if refiner else 1}.model."
    out.update(_bigg(tensors["text_encoder_2"], prefix))
    return {k: v.contiguous().clone() for k, v in out.items()}, prefix


@pytest.fixture(scope="module", params=["base", "refiner"])
def model(request, tmp_path_factory):
    """(diffusers pipeline, folder, original-layout dict, bigG prefix, single-file path)."""
    root = tmp_path_factory.mktemp(request.param)
    pipe = save_sdxl(root / "folder", refiner=request.param == "refiner")
    original, prefix = _original_layout(root / "folder", pipe)
    path = root / "single" / "sdxl.safetensors"
    path.parent.mkdir()
    save_file(original, str(path))
    for name in ("tokenizer", "tokenizer_2"):
        if (root / "folder" / name).is_dir():
            shutil.copytree(root / "folder" / name, path.parent / name)
    return pipe, root / "folder", original, prefix, path


def test_file_is_genuine_sdxl_layout(model):
    """diffusers' own converters map the file back to exactly the folder's tensors."""
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint, convert_open_clip_checkpoint)
    pipe, folder, original, prefix, _ = model
    reference = _folder_tensors(folder)
    assert_same_tensors(convert_ldm_unet_checkpoint(original, pipe.unet.config), reference["unet"])
    assert_same_tensors(convert_ldm_vae_checkpoint(original, pipe.vae.config), reference["vae"])
    assert_same_tensors(convert_open_clip_checkpoint(pipe.text_encoder_2, original, prefix=prefix),
                        reference["text_encoder_2"])
    if "text_encoder" in reference:
        assert_same_tensors(convert_ldm_clip_checkpoint(original, "conditioner.embedders.0.transformer."),
                            reference["text_encoder"])


def test_sdxl_single_file_loads_to_identical_tensors(model):
    pipe, folder, _, _, path = model
    from_folder, from_file = load_components(folder), load_components(path)
    assert type(from_file) is type(from_folder)
    for name in COMPONENTS:
        expected, got = getattr(from_folder, name), getattr(from_file, name)
        if expected is None:  # the refiner has no CLIP ViT-L
            assert got is None
            continue
        expected, got = expected.state_dict(), got.state_dict()
        assert list(got) == list(expected), name
        for key in expected:
            assert torch.equal(got[key], expected[key]), f"{name}: {key}"
    for name in ("unet", "vae"):
        ours, theirs = (dataclasses.replace(getattr(c, name).config, sample_size=0) for c in (from_file, from_folder))
        assert ours == theirs, name
    assert from_file.unet.config.sample_size == 128  # SDXL's 1024x1024
    for flag in ("force_zeros_for_empty_prompt", "requires_aesthetics_score"):
        assert getattr(from_file, flag) == getattr(from_folder, flag), flag


def test_sdxl_single_file_generates_the_folders_picture(model):
    _, folder, _, _, path = model
    kwargs = dict(steps=2, seed=5, guidance_scale=5.0, scheduler="euler", output="latent", height=16, width=16)
    if load_components(folder).requires_aesthetics_score:
        kwargs["image"] = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
        kwargs["strength"] = 1.0
    from_folder = sdrt.load(folder, device="cpu", dtype="float32")("a fox", **kwargs)
    from_file = sdrt.load(path, device="cpu", dtype="float32")("a fox", **kwargs)
    assert torch.equal(from_file.latents, from_folder.latents)

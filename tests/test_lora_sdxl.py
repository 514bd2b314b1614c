"""SDXL LoRA: U-Net and both text encoders, in kohya (`lora_unet_`, `lora_te1_`, `lora_te2_`) and diffusers
(`unet.`, `text_encoder.`, `text_encoder_2.`) spellings, against diffusers' StableDiffusionXLPipeline
`load_lora_weights` + `fuse_lora` on the tiny SDXL. Tolerance: latents <= 1e-3 (as tests/test_lora.py)."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import sdrt

from lora_files import TEXT_PARTS, UNET_PARTS, _factors, lora_layers
from sdxl_factories import save_sdxl

LATENT_TOL = 1e-3


def _write(path, reference, kohya: bool, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    groups = (("lora_unet_" if kohya else "unet.", reference.unet, UNET_PARTS),
              ("lora_te1_" if kohya else "text_encoder.", reference.text_encoder, TEXT_PARTS),
              ("lora_te2_" if kohya else "text_encoder_2.", reference.text_encoder_2, TEXT_PARTS))
    for prefix, root, parts in groups:
        for name, m in lora_layers(root, parts).items():
            down, up = _factors(m, 4, g)
            if kohya:
                key = prefix + name.replace(".", "_")
                tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"] = down, up
                tensors[f"{key}.alpha"] = torch.tensor(2.0)
            else:
                tensors[f"{prefix}{name}.lora_A.weight"], tensors[f"{prefix}{name}.lora_B.weight"] = down, up
    save_file(tensors, str(path))


@pytest.mark.parametrize("kohya", [True, False], ids=["kohya", "diffusers"])
def test_sdxl_lora_matches_diffusers(tmp_path, kohya):
    import diffusers
    reference = save_sdxl(tmp_path / "model")
    saved = diffusers.EulerDiscreteScheduler.load_config(tmp_path / "model" / "scheduler")
    reference.scheduler = diffusers.DDIMScheduler.from_config(saved)  # sdrt's default scheduler
    file = tmp_path / "sdxl_lora.safetensors"
    _write(file, reference, kohya, seed=3)
    pipe = sdrt.load(tmp_path / "model", device="cpu", dtype="float32")
    before = {k: v.clone() for k, v in pipe.text_encoder_2.state_dict().items()}
    base = pipe("a red cube", steps=3, seed=7, guidance_scale=5.0, output="latent").latents
    pipe.load_lora(file, scale=0.6)
    ours = pipe("a red cube", steps=3, seed=7, guidance_scale=5.0, output="latent").latents
    assert any(not torch.equal(v, before[k]) for k, v in pipe.text_encoder_2.state_dict().items())

    reference.load_lora_weights(str(file), adapter_name="x")
    reference.fuse_lora(lora_scale=0.6)
    theirs = reference("a red cube", num_inference_steps=3, guidance_scale=5.0, output_type="latent",
                       generator=torch.Generator("cpu").manual_seed(7)).images
    assert (ours - base).abs().max() > 100 * LATENT_TOL
    assert (ours - theirs).abs().max().item() <= LATENT_TOL
    pipe.unload_lora()
    assert all(torch.equal(v, before[k]) for k, v in pipe.text_encoder_2.state_dict().items())

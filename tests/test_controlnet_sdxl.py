"""SDXL ControlNets: parity with diffusers' StableDiffusionXLControlNet{,Img2Img}Pipeline (one ControlNet or a
MultiControlNetModel of two) on the tiny SDXL of `sdxl_factories`, saved with save_pretrained.

CPU, float32, 16x16 images, 3 steps. Tolerance (issue 17's acceptance): final latents max abs diff <= 1e-3."""
from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

import sdrt
from controlnet_factories import control_picture, save_sdxl_controlnet
from sdrt.errors import InvalidInputError
from sdxl_factories import save_sdxl

LATENT_TOL = 1e-3


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl-controlnet")
    base = save_sdxl(root / "base")
    nets = [save_sdxl_controlnet(root / f"cn{seed}", base.unet, seed) for seed in (1, 2)]
    pipes = {n: sdrt.load(root / "base", device="cpu", dtype="float32",
                          controlnet=root / "cn1" if n == 1 else [root / "cn1", root / "cn2"]) for n in (1, 2)}
    return root, base, nets, pipes


def _reference(saved, n: int, mode: str):
    import diffusers

    root, base, nets, _ = saved
    cls = {"txt2img": diffusers.StableDiffusionXLControlNetPipeline,
           "img2img": diffusers.StableDiffusionXLControlNetImg2ImgPipeline,
           "inpaint": diffusers.StableDiffusionXLControlNetInpaintPipeline}[mode]
    parts = {k: v for k, v in base.components.items() if k not in ("image_encoder", "feature_extractor")}
    pipe = cls(**parts, controlnet=nets[0] if n == 1 else diffusers.MultiControlNetModel(nets))
    pipe.set_progress_bar_config(disable=True)
    # DDIM from the saved scheduler config, as sdrt's default scheduler="ddim" reads it
    pipe.scheduler = diffusers.DDIMScheduler.from_config(diffusers.DDIMScheduler.load_config(root / "base" /
                                                                                              "scheduler"))
    return pipe


@pytest.mark.parametrize("n,mode,control", [
    (1, "txt2img", {}),
    (2, "txt2img", {"controlnet_conditioning_scale": [0.7, 1.3], "control_guidance_end": [1.0, 0.5]}),
    (2, "txt2img", {"guess_mode": True}),
    (1, "img2img", {"controlnet_conditioning_scale": 0.9}),
    (1, "inpaint", {}),
], ids=["one", "two-scales-end", "two-guess", "img2img", "inpaint-default-scale"])
def test_matches_diffusers(saved, n, mode, control):
    pipes = saved[3]
    images = [control_picture(seed=11), control_picture(seed=12)][:n]
    control_image = images[0] if n == 1 else images
    common = dict(prompt="a photo of a red cat", negative_prompt="blurry", guidance_scale=5.0, **control)
    ours, theirs = {"control_image": control_image}, {}
    if mode == "txt2img":
        theirs["image"] = control_image
    else:
        photo = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8))
        ours.update(image=photo, strength=0.7)
        theirs.update(image=photo, control_image=control_image, strength=0.7)
    if mode == "inpaint":
        mask = np.zeros((16, 16), dtype=np.uint8)
        mask[4:12, 2:10] = 255
        ours["mask"] = theirs["mask_image"] = PIL.Image.fromarray(mask)
    got = pipes[n](steps=3, seed=7, output="latent", **common, **ours).latents
    expected = _reference(saved, n, mode)(num_inference_steps=3, generator=torch.Generator("cpu").manual_seed(7),
                                             output_type="latent", **common, **theirs).images
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= LATENT_TOL


def test_an_sd_controlnet_on_sdxl_is_refused(saved, tmp_path):
    from controlnet_factories import save_controlnet

    root = saved[0]
    save_controlnet(tmp_path / "sd", 3)
    with pytest.raises(InvalidInputError, match=r"was made for another base model: its addition_embed_type is "
                                                r"None, the model .*'s is text_time$"):
        sdrt.load(root / "base", device="cpu", dtype="float32", controlnet=tmp_path / "sd")
    with pytest.raises(InvalidInputError, match=r"SDXL ControlNets run on the torch and triton backends so far"):
        sdrt.load(root / "base", device="cpu", dtype="float32", backend="onnxruntime", controlnet=root / "cn1")

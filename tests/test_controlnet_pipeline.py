"""ControlNet pipelines: parity with diffusers' StableDiffusionControlNet{,Img2Img,Inpaint}Pipeline (one ControlNet
or a MultiControlNetModel of two) on the same random tiny weights, saved with save_pretrained and loaded by both.

CPU, float32, 16x16 images (8x8 latents), 3-4 steps. Tolerance (issue 17's acceptance): final latents max abs
diff <= 1e-3.
"""
from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

import sdrt
from controlnet_factories import control_picture, save_controlnet
from factories import save_pipeline
from sdrt.errors import InvalidInputError

LATENT_TOL = 1e-3
SIZE = 16
SCHEDULERS = {"ddim": "DDIMScheduler", "euler_a": "EulerAncestralDiscreteScheduler"}
KIND_OF_MODE = {"txt2img": "sd1", "img2img": "sd1", "inpaint9": "inpaint", "inpaint4": "inpaint4"}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """{"models": kind -> (folder, diffusers pipeline), "nets": [(folder, diffusers ControlNet)] * 2}."""
    models = {}
    for kind in ("sd1", "inpaint", "inpaint4"):
        path = tmp_path_factory.mktemp(kind)
        models[kind] = (path, save_pipeline(path, kind))
    nets = []
    for seed in (1, 2):
        path = tmp_path_factory.mktemp(f"controlnet{seed}")
        nets.append((path, save_controlnet(path, seed)))
    return {"models": models, "nets": nets}


@pytest.fixture(scope="module")
def pipes(saved):
    """(kind, number of ControlNets) -> sdrt pipeline, loaded once."""
    cache = {}

    def get(kind: str, n: int):
        if (kind, n) not in cache:
            paths = [p for p, _ in saved["nets"][:n]]
            cache[kind, n] = sdrt.load(saved["models"][kind][0], device="cpu", dtype="float32",
                                       controlnet=paths[0] if n == 1 else paths)
        return cache[kind, n]
    return get


def _reference(saved, mode: str, n: int, scheduler: str):
    import diffusers

    path, base = saved["models"][KIND_OF_MODE[mode]]
    nets = [net for _, net in saved["nets"][:n]]
    controlnet = nets[0] if n == 1 else diffusers.MultiControlNetModel(nets)
    cls = {"txt2img": diffusers.StableDiffusionControlNetPipeline,
           "img2img": diffusers.StableDiffusionControlNetImg2ImgPipeline}.get(
        mode, diffusers.StableDiffusionControlNetInpaintPipeline)
    parts = {k: v for k, v in base.components.items() if k != "image_encoder"}
    reference = cls(**parts, controlnet=controlnet)
    reference.set_progress_bar_config(disable=True)
    saved_config = diffusers.DDIMScheduler.load_config(path / "scheduler")
    reference.scheduler = getattr(diffusers, SCHEDULERS[scheduler]).from_config(saved_config)
    return reference


def _input_image() -> PIL.Image.Image:
    rng = np.random.default_rng(0)
    return PIL.Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))


def _input_mask() -> PIL.Image.Image:
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[4:12, 2:10] = 255
    return PIL.Image.fromarray(mask)


def _run_both(saved, pipes, mode: str, n: int, *, scheduler="ddim", guidance=7.5, steps=4, seed=7, control=None):
    """sdrt and diffusers on the same arguments -> (sdrt latents, diffusers latents)."""
    control = dict(control or {})
    images = [control_picture(seed=11), control_picture(seed=12)][:n]
    control_image = images[0] if n == 1 else images
    prompt = dict(prompt="a photo of a red cat", negative_prompt="blurry", guidance_scale=guidance)
    ours, theirs = dict(control_image=control_image), {}
    if mode == "txt2img":
        theirs["image"] = control_image
    else:
        ours["image"] = theirs["image"] = _input_image()
        theirs["control_image"] = control_image
        if mode == "img2img":
            ours["strength"] = theirs["strength"] = 0.75
        else:
            ours["mask"] = theirs["mask_image"] = _input_mask()
    result = pipes(KIND_OF_MODE[mode], n)(steps=steps, scheduler=scheduler, seed=seed, output="latent", **prompt,
                                          **ours, **control)
    reference = _reference(saved, mode, n, scheduler)
    expected = reference(num_inference_steps=steps, generator=torch.Generator("cpu").manual_seed(seed),
                         output_type="latent", **prompt, **theirs, **control).images
    return result.latents, expected


def _assert_close(got, expected):
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= LATENT_TOL


@pytest.mark.parametrize("n,scheduler,guidance,control", [
    (1, "ddim", 7.5, {}),
    (1, "euler_a", 1.0, {"controlnet_conditioning_scale": 0.6}),
    (1, "ddim", 7.5, {"control_guidance_start": 0.25, "control_guidance_end": 0.75}),
    (1, "ddim", 7.5, {"guess_mode": True, "controlnet_conditioning_scale": 1.5}),
    (2, "ddim", 7.5, {"controlnet_conditioning_scale": [0.7, 1.3]}),
    (2, "euler_a", 7.5, {"control_guidance_start": [0.0, 0.5], "control_guidance_end": [0.5, 1.0]}),
    (2, "ddim", 7.5, {"guess_mode": True}),
], ids=["one", "scale-euler_a-nocfg", "start-end", "guess", "two-scales", "two-start-end", "two-guess"])
def test_txt2img_matches_diffusers(saved, pipes, n, scheduler, guidance, control):
    _assert_close(*_run_both(saved, pipes, "txt2img", n, scheduler=scheduler, guidance=guidance, control=control))


@pytest.mark.parametrize("mode,n", [("img2img", 1), ("img2img", 2), ("inpaint9", 1), ("inpaint4", 2)])
def test_image_modes_match_diffusers(saved, pipes, mode, n):
    control = ({"controlnet_conditioning_scale": [0.8, 1.2]} if n == 2 else
               {"controlnet_conditioning_scale": 1.0, "control_guidance_end": 0.6})
    _assert_close(*_run_both(saved, pipes, mode, n, steps=4, control=control))


@pytest.mark.parametrize("mode", ["img2img", "inpaint9"])
def test_default_scale_is_diffusers_default_for_the_mode(saved, pipes, mode):
    """No controlnet_conditioning_scale on either side: img2img 0.8, inpainting 0.5 (txt2img's 1.0: the "one"
    case of test_txt2img_matches_diffusers)."""
    _assert_close(*_run_both(saved, pipes, mode, 1, steps=3))


def test_the_controlnet_changes_the_picture(saved, pipes):
    """The parity above is not vacuous: the same call without the ControlNet's effect differs."""
    pipe = pipes("sd1", 1)
    kwargs = dict(prompt="a cat", steps=3, seed=3, output="latent", control_image=control_picture())
    with_net = pipe(**kwargs).latents
    without = pipe(**kwargs, controlnet_conditioning_scale=0.0).latents
    assert (with_net - without).abs().max().item() > 1e-2


def test_control_image_sets_the_size_and_must_match_it(saved, pipes):
    pipe = pipes("sd1", 1)
    wide = control_picture().resize((24, 16))
    assert pipe("a cat", steps=1, output="latent", control_image=wide).latents.shape == (1, 4, 8, 12)
    with pytest.raises(InvalidInputError, match=r"^control_image is 24x16 but the output is 16x16: give control "
                                                r"images of the output's size$"):
        pipe("a cat", steps=1, height=16, width=16, control_image=wide)
    with pytest.raises(InvalidInputError, match=r"control_image is 24x16 but the output is 16x16"):
        pipe("a cat", steps=1, image=_input_image(), control_image=wide)


@pytest.mark.parametrize("kwargs,match", [
    ({}, r"this pipeline has 2 ControlNets: pass control_image= \(one image per ControlNet, as a list\)"),
    ({"control_image": "one"}, r"control_image must hold one image per ControlNet \(2\), got 1"),
    ({"control_image": "pair", "controlnet_conditioning_scale": [1.0]},
     r"controlnet_conditioning_scale must be a number or a list of one per ControlNet \(2\), got a list of 1"),
    ({"control_image": "pair", "control_guidance_start": 0.6, "control_guidance_end": [1.0, 0.5]},
     r"control_guidance_start\[1\]=0.6 must be below control_guidance_end\[1\]=0.5"),
    ({"control_image": "pair", "control_guidance_end": 1.5}, r"control_guidance_end must lie in \[0, 1\], got 1.5"),
    ({"control_image": "pair", "guess_mode": 1}, r"guess_mode must be True or False, got 1"),
])
def test_bad_control_arguments(saved, pipes, kwargs, match):
    pipe = pipes("sd1", 2)
    image = control_picture()
    kwargs = dict(kwargs)
    if kwargs.get("control_image") == "one":
        kwargs["control_image"] = image
    elif kwargs.get("control_image") == "pair":
        kwargs["control_image"] = [image, image]
    with pytest.raises(InvalidInputError, match=match):
        pipe("a cat", steps=1, **kwargs)


def test_control_arguments_need_a_controlnet(saved):
    pipe = sdrt.load(saved["models"]["sd1"][0], device="cpu", dtype="float32")
    with pytest.raises(InvalidInputError, match=r"^control_image, controlnet_conditioning_scale, control_preprocess "
                                                r"and guess_mode need a ControlNet: "):
        pipe("a cat", steps=1, control_image=control_picture())


@pytest.mark.parametrize("overrides,match", [
    ({"cross_attention_dim": 64}, r"its cross_attention_dim is 64, the model .*'s is 128"),
    ({"block_out_channels": (32, 32)}, r"its block_out_channels is \[32, 32\], the model .*'s is \[32, 64\]"),
    ({"conditioning_embedding_out_channels": (16, 32, 32)},
     r"its control images have 4 pixels per latent, the model .*'s VAE 2"),
])
def test_controlnet_for_another_base_model_is_refused(saved, tmp_path, overrides, match):
    path = tmp_path / "other"
    save_controlnet(path, 5, **overrides)
    model = saved["models"]["sd1"][0]
    with pytest.raises(InvalidInputError, match=rf"^controlnet {path} was made for another base model: {match}"):
        sdrt.load(model, device="cpu", dtype="float32", controlnet=path)


def test_a_preprocessor_by_name_is_the_same_as_its_image(saved, pipes):
    from sdrt.control_preprocess import canny

    pipe = pipes("sd1", 2)
    picture, ready = _input_image(), control_picture()
    kwargs = dict(prompt="a cat", steps=2, seed=1, output="latent")
    by_name = pipe(**kwargs, control_image=[picture, ready], control_preprocess=["canny:50:150", None]).latents
    given = pipe(**kwargs, control_image=[canny(picture, 50, 150), ready]).latents
    assert torch.equal(by_name, given)
    with pytest.raises(InvalidInputError, match=r"unknown control preprocessor 'sobel'"):
        pipe(**kwargs, control_image=[picture, ready], control_preprocess="sobel")

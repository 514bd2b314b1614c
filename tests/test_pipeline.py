"""End-to-end parity with diffusers' StableDiffusion{,Img2Img,Inpaint}Pipeline on the same random tiny weights.

CPU, float32, 16x16 images (8x8 latents), 3-4 steps. Tolerances (the issue's acceptance): final latents
max abs diff <= 1e-3, np images <= 2/255. For 4-channel inpainting sdrt composites the input back outside
the mask, so there the image is compared inside the mask and must equal the input outside it.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import PIL.Image
import pytest
import torch

import sdrt
from factories import save_pipeline


LATENT_TOL = 1e-3
IMAGE_TOL = 2 / 255
SIZE = 16
SCHEDULERS = {"ddim": "DDIMScheduler", "euler_a": "EulerAncestralDiscreteScheduler"}
KIND_OF_MODE = {"txt2img": "sd1", "img2img": "sd1", "inpaint9": "inpaint", "inpaint4": "inpaint4"}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """kind -> (sdrt pipeline, diffusers pipeline, saved folder) on the same weights."""
    out = {}
    for kind in ("sd1", "inpaint", "inpaint4"):
        path = tmp_path_factory.mktemp(kind)
        reference = save_pipeline(path, kind)
        out[kind] = (sdrt.load(path, device="cpu", dtype="float32"), reference, path)
    return out


def _reference(models, mode: str, scheduler: str):
    import diffusers
    pipe, reference, path = models[KIND_OF_MODE[mode]]
    if mode == "img2img":
        reference = diffusers.StableDiffusionImg2ImgPipeline(**reference.components)
        reference.set_progress_bar_config(disable=True)
    # configured from the saved scheduler_config.json, as a diffusers user loading the folder would be
    # (an in-memory config would instead drop the DDIM-default timestep_spacing it never saw)
    saved = diffusers.DDIMScheduler.load_config(path / "scheduler")
    reference.scheduler = getattr(diffusers, SCHEDULERS[scheduler]).from_config(saved)
    return pipe, reference


def _input_image() -> PIL.Image.Image:
    rng = np.random.default_rng(0)
    return PIL.Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))


def _input_mask() -> PIL.Image.Image:
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[4:12, 2:10] = 255  # white = repaint
    return PIL.Image.fromarray(mask)


def _mode_kwargs(mode: str, strength: Optional[float]) -> tuple[dict, dict]:
    """(sdrt kwargs, diffusers kwargs) for the image inputs of a mode."""
    if mode == "txt2img":
        return {}, {}
    image = _input_image()
    given = {} if strength is None else {"strength": strength}  # None: each side's default
    if mode == "img2img":
        return {"image": image, **given}, {"image": image, **given}
    mask = _input_mask()
    return ({"image": image, "mask": mask, **given},
            {"image": image, "mask_image": mask, "height": SIZE, "width": SIZE, **given})


def _run_both(models, mode, scheduler, guidance, *, strength=0.75, steps=4, seed=7, sdrt_extra=None, ref_extra=None):
    pipe, reference = _reference(models, mode, scheduler)
    ours, theirs = _mode_kwargs(mode, strength)
    ours.update(sdrt_extra or {})
    theirs.update(ref_extra or {})
    common = dict(guidance_scale=guidance)
    result = pipe(steps=steps, scheduler=scheduler, seed=seed, output="np", **common, **ours)
    generator = ([torch.Generator("cpu").manual_seed(s) for s in seed] if isinstance(seed, list)
                 else torch.Generator("cpu").manual_seed(seed))
    ref_latents = reference(num_inference_steps=steps, generator=generator, output_type="latent",
                            **common, **theirs).images
    # diffusers' output_type="np" without a safety checker: decode, then VaeImageProcessor.postprocess
    with torch.no_grad():
        decoded = reference.vae.decode(ref_latents / reference.vae.config.scaling_factor).sample
    ref_images = reference.image_processor.postprocess(decoded, output_type="np")
    return result, ref_latents, ref_images


def _assert_parity(mode, result, ref_latents, ref_images):
    assert result.images.shape == ref_images.shape
    assert (result.latents - ref_latents).abs().max().item() <= LATENT_TOL
    if mode != "inpaint4":
        assert np.abs(result.images - ref_images).max() <= IMAGE_TOL
        return
    repaint = np.asarray(_input_mask())[None, ..., None] >= 128  # [1, H, W, 1]
    inside = np.abs(result.images - ref_images) * repaint
    assert inside.max() <= IMAGE_TOL
    original = np.asarray(_input_image()).astype(np.float32)[None] / 255
    assert np.abs((result.images - original) * ~repaint).max() <= 1e-6  # composited: outside is the input


@pytest.mark.parametrize("guidance", [1.0, 7.5])
@pytest.mark.parametrize("scheduler", ["ddim", "euler_a"])
@pytest.mark.parametrize("mode", ["txt2img", "img2img", "inpaint9", "inpaint4"])
def test_seeded_generation_matches_diffusers(models, mode, scheduler, guidance):
    prompt = {"prompt": "a photo of a red cat", "negative_prompt": "blurry"}
    result, ref_latents, ref_images = _run_both(models, mode, scheduler, guidance, sdrt_extra=prompt, ref_extra=prompt)
    assert result.seeds == [7]
    _assert_parity(mode, result, ref_latents, ref_images)


@pytest.mark.parametrize("mode", ["img2img", "inpaint9", "inpaint4"])
def test_default_strength_matches_diffusers(models, mode):
    """No strength on either side: each mode takes its diffusers pipeline's default (img2img 0.8, inpainting 1.0)."""
    prompt = {"prompt": "a photo of a red cat"}
    result, ref_latents, ref_images = _run_both(models, mode, "ddim", 7.5, strength=None, sdrt_extra=prompt,
                                                ref_extra=prompt)
    _assert_parity(mode, result, ref_latents, ref_images)


@pytest.mark.parametrize("guidance", [1.0, 7.5])
@pytest.mark.parametrize("scheduler", ["ddim", "euler_a"])
@pytest.mark.parametrize("mode", ["txt2img", "inpaint9", "inpaint4"])
def test_explicit_latents_and_embeddings_match_diffusers(models, mode, scheduler, guidance):
    pipe, reference, _ = models[KIND_OF_MODE[mode]]
    with torch.no_grad():
        cond, uncond = reference.encode_prompt("a castle", "cpu", 1, True, "fog")
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    inputs = {"prompt_embeds": cond, "negative_prompt_embeds": uncond, "latents": latents}
    # strength 1: diffusers' inpainting starts from the given latents only then (see sdrt.pipeline)
    result, ref_latents, ref_images = _run_both(models, mode, scheduler, guidance, strength=1.0, steps=3,
                                                sdrt_extra=inputs, ref_extra=inputs)
    _assert_parity(mode, result, ref_latents, ref_images)


@pytest.mark.parametrize("mode", ["txt2img", "img2img", "inpaint9"])
def test_seed_list_draws_per_image_like_a_generator_list(models, mode):
    kwargs = {"prompt": ["a dog", "a tree"]}
    result, ref_latents, ref_images = _run_both(models, mode, "euler_a", 7.5, seed=[11, 12], sdrt_extra=kwargs,
                                                ref_extra=kwargs)
    assert result.seeds == [11, 12]
    _assert_parity(mode, result, ref_latents, ref_images)


def test_num_images_shares_one_generator_like_diffusers(models):
    kwargs = {"prompt": "a dog"}
    result, ref_latents, ref_images = _run_both(models, "txt2img", "euler_a", 7.5, sdrt_extra=dict(kwargs, num_images=2),
                                                ref_extra=dict(kwargs, num_images_per_prompt=2))
    assert result.seeds == [7, 7]
    _assert_parity("txt2img", result, ref_latents, ref_images)


def test_v_prediction_model_matches_diffusers(tmp_path):
    reference = save_pipeline(tmp_path, "sd2")
    pipe = sdrt.load(tmp_path, device="cpu", dtype="float32")
    result = pipe("a lighthouse", steps=3, seed=5, output="np")
    ref = reference("a lighthouse", num_inference_steps=3, generator=torch.Generator("cpu").manual_seed(5),
                    output_type="np").images
    assert np.abs(result.images - ref).max() <= IMAGE_TOL


def test_outputs_seeds_and_timings(models):
    pipe = models["sd1"][0]
    pil = pipe("a cat", steps=2, seed=3)
    assert len(pil.images) == 1 and pil.images[0].size == (SIZE, SIZE) and pil.images[0].mode == "RGB"
    latent = pipe("a cat", steps=2, seed=3, output="latent")
    assert torch.equal(latent.images, pil.latents) and latent.images.shape == (1, 4, 8, 8)
    np_out = pipe("a cat", steps=2, seed=3, output="np")
    assert np.array_equal((np_out.images[0] * 255).round().astype(np.uint8), np.asarray(pil.images[0]))
    assert {"encode_prompt", "denoise", "decode", "total"} <= set(pil.timings)
    assert all(v >= 0 for v in pil.timings.values())
    fresh = pipe("a cat", steps=2, num_images=2)  # seed=None: a fresh seed, reported, that regenerates
    assert len(fresh.seeds) == 2 and fresh.seeds[0] == fresh.seeds[1]
    again = pipe("a cat", steps=2, num_images=2, seed=fresh.seeds[0])
    assert torch.equal(again.latents, fresh.latents)


def test_nan_in_final_latents_raises(models, monkeypatch):
    pipe = models["sd1"][0]
    monkeypatch.setattr(pipe, "unet", lambda x, t, ctx: torch.full_like(x, float("nan")))
    with pytest.raises(sdrt.NumericalError):
        pipe("a cat", steps=2, seed=0)

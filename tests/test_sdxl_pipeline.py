"""SDXL pipelines vs diffusers' StableDiffusionXLPipeline / ...Img2ImgPipeline on the same random tiny weights
(folders saved with save_pretrained). CPU, float32, the model's default size (16x16: sample_size 8 x VAE
factor 2, SDXL's 1024 at full size), 3-4 steps, seed only. Tolerances (the issue's): final latents max abs
<= 1e-3, np images <= 2/255."""
from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

import sdrt
from sdxl_factories import PROJECTION, load_sdxl_pairs

LATENT_TOL = 1e-3
IMAGE_TOL = 2 / 255
SCHEDULERS = {"ddim": "DDIMScheduler", "euler_a": "EulerAncestralDiscreteScheduler"}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """"base" / "refiner" -> (sdrt pipeline, diffusers pipeline, folder)."""
    return load_sdxl_pairs(tmp_path_factory)


def _reference(models, name: str, scheduler: str, cls: str = None):
    import diffusers
    pipe, reference, path = models[name]
    if cls is not None:
        reference = getattr(diffusers, cls)(**reference.components)
        reference.set_progress_bar_config(disable=True)
    saved = diffusers.EulerDiscreteScheduler.load_config(path / "scheduler")
    reference.scheduler = getattr(diffusers, SCHEDULERS[scheduler]).from_config(saved)
    return pipe, reference


def _compare(ours, theirs_latents, theirs_images):
    assert (ours.latents - theirs_latents).abs().max().item() <= LATENT_TOL
    assert np.abs(ours.images - theirs_images).max() <= IMAGE_TOL


def _run_both(pipe, reference, seed=7, steps=3, **kwargs):
    ours = pipe(**kwargs, steps=steps, seed=seed, output="np")
    theirs = {}
    for output in ("latent", "np"):
        ref_kwargs = {("num_images_per_prompt" if k == "num_images" else k): v for k, v in kwargs.items()
                      if k != "scheduler"}
        theirs[output] = reference(**ref_kwargs, num_inference_steps=steps, output_type=output,
                                   generator=torch.Generator("cpu").manual_seed(seed)).images
    return ours, theirs["latent"], theirs["np"]


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
@pytest.mark.parametrize("guidance", [1.0, 5.0])
def test_txt2img_matches_diffusers(models, scheduler, guidance):
    pipe, reference = _reference(models, "base", scheduler)
    ours, lat, img = _run_both(pipe, reference, prompt=["a red cube", "a blue sphere"], guidance_scale=guidance,
                               scheduler=scheduler)
    assert ours.images.shape == (2, 16, 16, 3)  # the model's native size by default
    _compare(ours, lat, img)


def test_txt2img_conditioning_arguments_match_diffusers(models):
    """Sizes, crops, negative sizes and a negative prompt (no zeroed negatives) as diffusers uses them. One image:
    for a batch diffusers interleaves the [negative; positive] ids (`.repeat(batch, 1)`) against the
    [uncond x B; cond x B] context, so its images past the first get the other half's ids; sdrt does not."""
    pipe, reference = _reference(models, "base", "ddim")
    ours, lat, img = _run_both(pipe, reference, prompt="a cat", negative_prompt="blurry", guidance_scale=5.0,
                               scheduler="ddim", original_size=(64, 48), crops_coords_top_left=(4, 2),
                               target_size=(32, 32), negative_original_size=(8, 8),
                               negative_crops_coords_top_left=(1, 1), negative_target_size=(16, 24))
    plain = pipe(prompt="a cat", negative_prompt="blurry", guidance_scale=5.0, steps=3, seed=7, output="latent")
    assert not torch.equal(plain.latents, ours.latents)  # the ids change the result
    _compare(ours, lat, img)


def test_prompt_embeds_need_pooled(models):
    pipe, _, _ = models["base"]
    with pytest.raises(sdrt.InvalidInputError, match="pooled_prompt_embeds"):
        pipe(prompt_embeds=torch.zeros(1, 77, 128), steps=2, seed=0, output="latent")
    same = pipe(prompt_embeds=torch.zeros(1, 77, 128), pooled_prompt_embeds=torch.zeros(1, PROJECTION),
                negative_prompt_embeds=torch.zeros(1, 77, 128), negative_pooled_prompt_embeds=torch.zeros(1, PROJECTION),
                steps=2, seed=0, output="latent")
    assert torch.isfinite(same.latents).all()


def _image() -> PIL.Image.Image:
    rng = np.random.default_rng(0)
    return PIL.Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))


@pytest.mark.parametrize("strength, scheduler, guidance", [(None, "euler_a", 5.0), (0.6, "ddim", 1.0)])
def test_img2img_matches_diffusers(models, strength, scheduler, guidance):
    pipe, reference = _reference(models, "base", scheduler, "StableDiffusionXLImg2ImgPipeline")
    given = {} if strength is None else {"strength": strength}
    ours, lat, img = _run_both(pipe, reference, prompt="a house", image=_image(), guidance_scale=guidance,
                               scheduler=scheduler, steps=6, **given)
    _compare(ours, lat, img)


@pytest.mark.parametrize("guidance", [1.0, 5.0])
def test_refiner_matches_diffusers(models, guidance):
    pipe, reference = _reference(models, "refiner", "ddim")
    assert pipe.text_encoder is None and pipe.requires_aesthetics_score
    ours, lat, img = _run_both(pipe, reference, prompt="a house", image=_image(), guidance_scale=guidance,
                               scheduler="ddim", strength=0.5, aesthetic_score=7.0, negative_aesthetic_score=2.0)
    _compare(ours, lat, img)


def test_bad_sdxl_arguments(models):
    pipe, _, _ = models["base"]
    for kwargs, match in (({"original_size": (0, 8)}, "original_size"), ({"crops_coords_top_left": "0,0"}, "crops"),
                          ({"aesthetic_score": float("nan")}, "aesthetic_score")):
        with pytest.raises(sdrt.InvalidInputError, match=match):
            pipe("a cat", steps=2, seed=0, **kwargs)
    with pytest.raises(sdrt.InvalidInputError, match="torch"):
        sdrt.load(models["base"][2], backend="tensorrt", device="cpu")

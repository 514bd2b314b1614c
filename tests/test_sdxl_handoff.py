"""The SDXL base -> refiner handoff (denoising_end / denoising_start) vs diffusers' ensemble-of-experts recipe on
the same random tiny weights: StableDiffusionXLPipeline(denoising_end=f, output_type="latent") then
StableDiffusionXLImg2ImgPipeline(image=those latents, denoising_start=f). CPU, float32, 16x16, seed only, two
schedulers x guidance 1.0 / 5.0. Tolerances (the issue's): latents max abs <= 1e-3 (the base's handed-over latents
and the refiner's final ones), np images <= 2/255."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import sdrt
from sdxl_factories import load_sdxl_pairs

LATENT_TOL = 1e-3
IMAGE_TOL = 2 / 255
SCHEDULERS = {"ddim": "DDIMScheduler", "euler_a": "EulerAncestralDiscreteScheduler"}
STEPS, SPLIT = 5, 0.6  # timesteps 801 601 401 | 201 1: the base runs 3 steps, the refiner 2


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """"base" / "refiner" -> (sdrt pipeline, diffusers pipeline, folder)."""
    return load_sdxl_pairs(tmp_path_factory)


def _with_scheduler(models, name: str, scheduler: str):
    import diffusers
    pipe, reference, path = models[name]
    saved = diffusers.EulerDiscreteScheduler.load_config(path / "scheduler")
    reference.scheduler = getattr(diffusers, SCHEDULERS[scheduler]).from_config(saved)
    return pipe, reference


@pytest.mark.parametrize("guidance", [1.0, 5.0])
@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_base_to_refiner_matches_diffusers(models, scheduler, guidance):
    base, ref_base = _with_scheduler(models, "base", scheduler)
    refiner, ref_refiner = _with_scheduler(models, "refiner", scheduler)
    prompts = ["a lighthouse at dusk", "a red bicycle"]
    steps = []
    handed = base(prompts, steps=STEPS, scheduler=scheduler, guidance_scale=guidance, seed=3, denoising_end=SPLIT,
                  output="latent", progress=lambda done, total: steps.append(total))
    assert steps == [3, 3, 3]
    final = refiner(prompts, image=handed.latents, steps=STEPS, scheduler=scheduler, guidance_scale=guidance, seed=4,
                    denoising_start=SPLIT, output="np")

    ref_handed = ref_base(prompts, num_inference_steps=STEPS, guidance_scale=guidance, denoising_end=SPLIT,
                          generator=torch.Generator("cpu").manual_seed(3), output_type="latent").images
    assert (handed.latents - ref_handed).abs().max().item() <= LATENT_TOL
    outputs = {}
    for output in ("latent", "np"):
        outputs[output] = ref_refiner(prompts, image=ref_handed, num_inference_steps=STEPS, guidance_scale=guidance,
                                      denoising_start=SPLIT, generator=torch.Generator("cpu").manual_seed(4),
                                      output_type=output).images
    assert (final.latents - outputs["latent"]).abs().max().item() <= LATENT_TOL
    assert np.abs(final.images - outputs["np"]).max() <= IMAGE_TOL


def test_handoff_splits_the_full_run(models):
    """DDIM, no noise after the start: base to 0.6 then the base itself from 0.6 is the same as one full run."""
    base, _ = _with_scheduler(models, "base", "ddim")
    whole = base("a cat", steps=STEPS, guidance_scale=5.0, seed=1, output="latent")
    first = base("a cat", steps=STEPS, guidance_scale=5.0, seed=1, denoising_end=SPLIT, output="latent")
    second = base("a cat", image=first.latents, steps=STEPS, guidance_scale=5.0, seed=1, denoising_start=SPLIT,
                  output="latent")
    assert (second.latents - whole.latents).abs().max().item() <= 1e-5


def test_bad_handoff_arguments(models):
    base = models["base"][0]
    latents = torch.zeros(1, 4, 8, 8)
    for kwargs, match in (({"denoising_end": 1.0}, "denoising_end"), ({"denoising_start": 0.5}, "needs image"),
                          ({"denoising_end": "0.5"}, "denoising_end"),
                          ({"image": latents, "denoising_start": 0.7, "denoising_end": 0.6}, "below"),
                          ({"image": latents, "denoising_start": 0.999}, "leave no step"),
                          ({"image": latents, "denoising_start": 0.5, "latents": latents}, "latents"),
                          ({"image": torch.zeros(3, 4, 8, 8)}, "must hold 1 .one per image"),
                          ({"image": latents, "mask": torch.ones(16, 16)}, "pixel image")):
        with pytest.raises(sdrt.InvalidInputError, match=match):
            base("a cat", steps=STEPS, seed=0, output="latent", **kwargs)

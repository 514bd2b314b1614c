"""Per-prompt guidance scales in one pipeline call (what `sdrt serve` batches need), on the bundled tiny model.

A sample's arithmetic in a batch with a guidance list is its own: bitwise the same whatever the other
samples of a same-size batch hold. Against a call of its own (another batch size) it may differ by the float
rounding of CPU convolution kernels, which pick their algorithm by batch size (`sdrt.serve.runner` turns
those off for its bitwise guarantee); measured <= 5e-5 on these latents, the tolerance below is 2e-4.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import sdrt
from sdrt.denoise import denoise
from sdrt.graphs import DenoiseGraphs, GraphCache
from sdrt.schedulers import make_scheduler

STEPS = 3
OTHER_BATCH_SIZE_TOL = 2e-4
PROMPTS = ["a red circle on a blue background", "a green square on a white background"]


@pytest.fixture(scope="module")
def pipe():
    return sdrt.load(device="cpu", dtype="float32")


@pytest.mark.parametrize("scheduler", ["euler_a"])
def test_a_batch_with_two_scales_equals_the_two_single_calls(pipe, scheduler):
    batch = pipe(PROMPTS, steps=STEPS, guidance_scale=[3.0, 7.3], scheduler=scheduler, seed=[1, 2], output="latent")
    for i, (prompt, scale, seed) in enumerate(zip(PROMPTS, (3.0, 7.3), (1, 2))):
        alone = pipe(prompt, steps=STEPS, guidance_scale=scale, scheduler=scheduler, seed=seed, output="latent")
        assert (batch.latents[i] - alone.latents[0]).abs().max().item() <= OTHER_BATCH_SIZE_TOL
    # the scales really differ per sample: one scale for both moves the second sample
    same = pipe(PROMPTS, steps=STEPS, guidance_scale=[3.0, 3.0], scheduler=scheduler, seed=[1, 2], output="latent")
    assert torch.equal(same.latents[0], batch.latents[0])
    assert (same.latents[1] - batch.latents[1]).abs().max().item() > 100 * OTHER_BATCH_SIZE_TOL


def test_a_sample_is_bitwise_the_same_in_any_company_of_one_batch_size(pipe):
    first = pipe([PROMPTS[0], PROMPTS[1], "a white triangle"], negative_prompt=["", "a red square", ""], steps=STEPS,
                 guidance_scale=[5.0, 2.5, 9.0], scheduler="euler_a", seed=[7, 8, 9], output="np")
    other = pipe(["a black circle", "a yellow square", PROMPTS[0]], negative_prompt=["a blue square", "", ""],
                 steps=STEPS, guidance_scale=[1.5, 4.0, 5.0], scheduler="euler_a", seed=[3, 4, 7], output="np")
    assert np.array_equal(first.images[0], other.images[2])


def test_a_list_of_one_scale_is_the_number_itself(pipe):
    as_list = pipe(PROMPTS[0], steps=STEPS, guidance_scale=[7.3], seed=3, output="latent")
    as_number = pipe(PROMPTS[0], steps=STEPS, guidance_scale=7.3, seed=3, output="latent")
    assert torch.equal(as_list.latents, as_number.latents)


def test_per_prompt_scales_cover_each_prompts_images(pipe):
    out = pipe(PROMPTS, steps=STEPS, guidance_scale=[3.0, 7.3], num_images=2, seed=[1, 2, 3, 4], output="latent")
    expanded = pipe([PROMPTS[0]] * 2 + [PROMPTS[1]] * 2, steps=STEPS, guidance_scale=[3.0, 3.0, 7.3, 7.3],
                    seed=[1, 2, 3, 4], output="latent")
    assert torch.equal(out.latents, expanded.latents)


@pytest.mark.parametrize("scale, words", [
    ([3.0, 1.0], ["all > 1", "all <= 1"]),
    ([3.0], ["one scale per prompt (2)"]),
    ([], ["non-empty"]),
    ([3.0, float("nan")], ["guidance_scale", "finite"]),
])
def test_bad_scale_lists_are_refused(pipe, scale, words):
    with pytest.raises(sdrt.InvalidInputError) as err:
        pipe(PROMPTS, steps=1, guidance_scale=scale, output="latent")
    for word in words:
        assert word in str(err.value)


def test_the_graph_runner_takes_a_scale_list_like_the_eager_loop(pipe):
    sched = make_scheduler("euler_a", pipe.scheduler_config)
    schedule = sched.set_timesteps(STEPS, device="cpu")
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=gen) * schedule.init_noise_sigma
    context = torch.randn(4, 77, pipe.unet.config.cross_attention_dim, generator=gen)
    noise = [torch.randn(2, 4, 8, 8, generator=gen) for _ in range(STEPS)]
    eager = denoise(pipe.unet, sched, schedule, latents, context, [2.0, 6.5], 0, noise)
    runner = DenoiseGraphs(GraphCache(), capture=False)
    assert torch.equal(runner(pipe.unet, sched, schedule, latents, context, [2.0, 6.5], 0, noise), eager)
    # a number and a list replay one capture (the scale is always a [B, 1, 1, 1] static input)
    assert torch.equal(runner(pipe.unet, sched, schedule, latents, context, 6.5, 0, noise),
                       denoise(pipe.unet, sched, schedule, latents, context, 6.5, 0, noise))
    assert runner.cache.captures == 1

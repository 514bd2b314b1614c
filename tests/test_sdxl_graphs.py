"""SDXL through the graphed denoising loop (`sdrt.graphs.DenoiseGraphs`): the U-Net's added inputs
(text_embeds, time_ids) are static inputs, by name, shape and dtype in the capture key.

On a CPU the runner runs uncaptured (the same loop function on the same static buffers a CUDA graph replays),
so bit-for-bit equality with the eager `denoise` proves the packing of the added inputs; the tiny SDXL base and
refiner of tests/sdxl_factories.py, torch backend, float32. The capture itself needs CUDA: those tests skip
without it. Target: < 15 s on 2 CPU cores.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import sdrt
from sdrt.denoise import denoise
from sdrt.graphs import DenoiseGraphs, GraphCache
from sdrt.schedulers import make_scheduler
from sdrt.sdxl_components import SDXL_SCHEDULER_CONFIG
from sdxl_factories import PROJECTION, TIME_DIM, save_sdxl

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture needs a CUDA GPU")


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    out = {}
    for name in ("base", "refiner"):
        path = tmp_path_factory.mktemp(f"sdxl-{name}")
        save_sdxl(path, refiner=name == "refiner")
        out[name] = sdrt.load(path, device="cpu", dtype="float32")
    return out


def _image() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)


def _mask() -> np.ndarray:
    mask = np.zeros((16, 16), dtype=np.uint8)
    mask[4:12, 2:10] = 255
    return mask


def _both(pipe, runner, **settings):
    """(eager result or error type, graphed result or error type) of one pipeline call."""
    outcomes = []
    for denoiser in (denoise, runner):
        pipe.denoiser = denoiser
        try:
            outcomes.append(pipe(**settings).latents)
        except sdrt.SdrtError as e:
            outcomes.append(type(e))
        finally:
            pipe.denoiser = denoise
    return outcomes


@pytest.mark.parametrize("name, extra", [
    ("base", dict(guidance_scale=5.0, scheduler="euler_a")),
    ("base", dict(guidance_scale=5.0, image=_image(), strength=0.7, original_size=(32, 24))),
    ("refiner", dict(guidance_scale=5.0, image=_image(), strength=0.7, aesthetic_score=7.0, scheduler="ddim")),
    ("base", dict(guidance_scale=5.0, image=_image(), mask=_mask(), strength=0.8)),  # blend + added inputs
    ("base", dict(guidance_scale=5.0, steps=4, denoising_end=0.5, scheduler="euler")),
    ("refiner", dict(guidance_scale=5.0, steps=4, image=torch.randn(1, 4, 8, 8), denoising_start=0.5,  # latents
                     scheduler="euler")),
])
def test_graph_runner_equals_the_eager_loop(pipes, name, extra):
    settings = dict(prompt="a red cube", steps=2, seed=3, output="latent") | extra
    eager, graphed = _both(pipes[name], DenoiseGraphs(GraphCache(), capture=False), **settings)
    assert torch.is_tensor(eager) and torch.equal(graphed, eager)


def test_graph_runner_accepts_and_rejects_exactly_what_the_eager_loop_does(pipes):
    """One runner across a sequence of calls: each gives the eager loop's latents bit for bit, or the same error;
    new ids or prompts reuse the capture, another batch captures anew."""
    pipe = pipes["base"]
    g = torch.Generator().manual_seed(0)
    embeds = {"prompt_embeds": torch.randn(1, 77, 128, generator=g), "negative_prompt_embeds": torch.zeros(1, 77, 128),
              "pooled_prompt_embeds": torch.randn(1, PROJECTION, generator=g),
              "negative_pooled_prompt_embeds": torch.zeros(1, PROJECTION)}
    cases = [(dict(prompt="a red cube"), "ok", 1),
             (dict(prompt="a dog", original_size=(64, 32), crops_coords_top_left=(8, 0)), "ok", 1),  # same shapes
             (embeds, "ok", 1),
             (dict(embeds, pooled_prompt_embeds=None), "InvalidInputError", 1),
             (dict(embeds, pooled_prompt_embeds=torch.zeros(1, PROJECTION + 1)), "InvalidInputError", 1),
             (dict(prompt="a red cube", num_images=2), "ok", 2),
             (dict(prompt="a red cube", guidance_scale=1.0), "ok", 3)]
    runner = DenoiseGraphs(GraphCache(max_entries=16), capture=False)
    for case, kind, captures in cases:
        eager, graphed = _both(pipe, runner, steps=2, seed=1, output="latent", **case)
        assert (eager.__name__ if isinstance(eager, type) else "ok") == kind, case
        assert torch.equal(graphed, eager) if kind == "ok" else graphed is eager, case
        assert runner.cache.captures == captures, case


def _loop_inputs(unet, batch: int = 1, cfg: bool = True, seed: int = 0, n_ids: int = 6, width: int = PROJECTION):
    sched = make_scheduler("euler_a", SDXL_SCHEDULER_CONFIG)
    schedule = sched.set_timesteps(3, device="cpu")
    g = torch.Generator().manual_seed(seed)
    n = 2 * batch if cfg else batch
    latents = torch.randn(batch, 4, 4, 4, generator=g)
    context = torch.randn(n, 77, unet.config.cross_attention_dim, generator=g)
    noise = [torch.randn(batch, 4, 4, 4, generator=g) if need else None for need in schedule.noise_steps]
    added = {"text_embeds": torch.randn(n, width, generator=g),
             "time_ids": torch.randint(0, 1024, (n, n_ids), generator=g).float()}
    return (sched, schedule, latents, context, 5.0 if cfg else 1.0, 0, noise), added


def test_key_holds_the_added_inputs_shapes_and_dtypes(pipes):
    unet = pipes["base"].unet
    graphs = DenoiseGraphs(GraphCache(), capture=False)
    args, added = _loop_inputs(unet)
    key = graphs.key(unet, *args, added=added)
    signature = {name: (shape, dtype) for name, shape, dtype, _ in key.inputs}
    assert signature["added.text_embeds"] == ((2, PROJECTION), "float32")
    assert signature["added.time_ids"] == ((2, 6), "float32")
    _, new_values = _loop_inputs(unet, seed=1)
    assert graphs.key(unet, *args, added=new_values) == key  # new prompt or ids: the same capture
    out = graphs(unet, *args, added=added)
    assert key in graphs.cache and torch.equal(out, denoise(unet, *args, added=added))
    others = {"no added inputs": graphs.key(unet, *args),
              "time_ids width": graphs.key(unet, *args, added=_loop_inputs(unet, n_ids=5)[1]),
              "text_embeds width": graphs.key(unet, *args, added=_loop_inputs(unet, width=PROJECTION // 2)[1]),
              "text_embeds only": graphs.key(unet, *args, added={"text_embeds": added["text_embeds"]})}
    double_args = (*args[:3], args[3].double(), *args[4:])
    others["dtype"] = graphs.key(unet, *double_args, added={k: v.double() for k, v in added.items()})
    for what, other in others.items():
        assert other != key, what
    assert len(set(others.values())) == len(others)


def test_bad_added_inputs_are_refused_the_same_by_both_loops(pipes):
    unet = pipes["base"].unet
    args, added = _loop_inputs(unet)
    bad = {"missing": None,
           "a batch of one under CFG": {k: v[:1] for k, v in added.items()},
           "another dtype": dict(added, time_ids=added["time_ids"].double()),
           "not a tensor": dict(added, time_ids=[[16, 16, 0, 0, 16, 16]] * 2),
           "ids of the refiner's width": _loop_inputs(unet, n_ids=5)[1]}  # 32 + 5 * 8 != the base's 80
    graphs = DenoiseGraphs(GraphCache(max_entries=16), capture=False)
    for what, value in bad.items():
        for run in (denoise, graphs):
            with pytest.raises(sdrt.InvalidInputError):
                run(unet, *args, added=value)
    assert unet.config.projection_class_embeddings_input_dim == PROJECTION + 6 * TIME_DIM


# ------------------------------------------------------------------------------------------ CUDA only
@requires_cuda
def test_captured_sdxl_loop_equals_the_eager_loop_on_cuda(pipes):
    unet = copy.deepcopy(pipes["base"].unet).cuda()
    graphs = DenoiseGraphs(GraphCache.for_device(torch.device("cuda")), capture=True)
    for seed in (0, 1):  # new latents, context, text_embeds and time_ids: one capture
        (sched, _, latents, context, guidance, start, noise), added = _loop_inputs(unet, seed=seed)
        schedule = sched.set_timesteps(3, device="cuda")
        cuda_args = (sched, schedule, latents.cuda(), context.cuda(), guidance, start,
                     [None if n is None else n.cuda() for n in noise])
        added = {k: v.cuda() for k, v in added.items()}
        with torch.inference_mode():
            eager = denoise(unet, *cuda_args, added=added)
            graphed = graphs(unet, *cuda_args, added=added)
        torch.testing.assert_close(graphed, eager, rtol=1e-5, atol=1e-5)
    assert graphs.cache.captures == 1

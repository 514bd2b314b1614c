"""sdrt.graphs: the graph cache's LRU and memory accounting, the capture key, and the graphed loop runner.

On a CPU the runner runs uncaptured (`capture=False`): the same loop function on the same static buffers
a CUDA graph would replay, so equality with the eager `denoise` (bit for bit: same ops on the same
values) proves the packing of inputs, the schedule tables, the guidance tensor, the step noise and the
inpainting blend. The capture itself needs CUDA: those tests skip without it. Target: < 15 s on 2 CPU cores.
"""
from __future__ import annotations

import copy

import pytest
import torch

import sdrt
from sdrt.models import random_weights
from sdrt.denoise import denoise
from sdrt.graphs import CapturedCall, DenoiseGraphs, GraphCache
from sdrt.pipeline import from_components
from sdrt.components import SD_SCHEDULER_CONFIG
from sdrt.schedulers import make_scheduler

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture needs a CUDA GPU")


class _Entry:
    def __init__(self, nbytes: int):
        self.nbytes = nbytes


# ------------------------------------------------------------------------------------------- cache
def test_cache_evicts_least_recently_used_beyond_max_entries():
    cache = GraphCache(max_entries=2)
    cache.get_or_create("a", lambda: _Entry(1))
    cache.get_or_create("b", lambda: _Entry(1))
    cache.get_or_create("a", lambda: pytest.fail("a is cached"))  # touch a: b is now the oldest
    cache.get_or_create("c", lambda: _Entry(1))
    assert cache.keys() == ["a", "c"]
    assert cache.captures == 3


def test_cache_evicts_to_its_byte_budget_but_keeps_the_newest():
    cache = GraphCache(max_entries=10, max_bytes=100)
    for key, size in (("a", 40), ("b", 40), ("c", 40)):
        cache.get_or_create(key, lambda size=size: _Entry(size))
    assert cache.keys() == ["b", "c"] and cache.total_bytes == 80
    cache.get_or_create("huge", lambda: _Entry(500))  # over budget alone: kept, everything else dropped
    assert cache.keys() == ["huge"] and cache.total_bytes == 500
    cache.clear()
    assert len(cache) == 0 and cache.total_bytes == 0


@pytest.mark.parametrize("kwargs", [dict(max_entries=0), dict(max_entries=True), dict(max_bytes=-1)])
def test_cache_rejects_bad_bounds(kwargs):
    with pytest.raises(sdrt.InvalidInputError):
        GraphCache(**kwargs)


def test_cache_on_cpu_has_no_byte_budget():
    assert GraphCache.for_device(torch.device("cpu")).max_bytes is None


# ------------------------------------------------------------------------------------ captured call
def test_uncaptured_call_runs_on_static_buffers_and_returns_copies():
    calls = []

    def fn(x, y):
        calls.append(x)
        return x * 2 + y, y - x

    example = (torch.ones(3), torch.zeros(3))
    call = CapturedCall(fn, example, capture=False)
    assert not call.captured and call.nbytes == 2 * 3 * 4
    a, b = call(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, 1.0, 1.0]))
    assert torch.equal(a, torch.tensor([3.0, 5.0, 7.0])) and torch.equal(b, torch.tensor([0.0, -1.0, -2.0]))
    assert calls[-1] is call.static_inputs[0]  # the function saw the static buffer, not the caller's tensor
    first = a
    call(torch.zeros(3), torch.zeros(3))
    assert torch.equal(first, torch.tensor([3.0, 5.0, 7.0]))  # earlier results are not overwritten
    with pytest.raises(sdrt.InvalidInputError, match="shape"):
        call(torch.zeros(4), torch.zeros(3))


def test_call_made_under_inference_mode_accepts_later_calls_outside_it():
    with torch.inference_mode():
        call = CapturedCall(lambda x: x * 2, [torch.ones(3)], capture=False)
        assert torch.equal(call(torch.ones(3)), torch.full((3,), 2.0))
    assert torch.equal(call(torch.arange(3.0)), torch.tensor([0.0, 2.0, 4.0]))
    with torch.inference_mode():
        assert torch.equal(call(torch.ones(3)), torch.full((3,), 2.0))


def test_capture_refuses_cpu_tensors():
    with pytest.raises(sdrt.InvalidInputError, match="CUDA"):
        CapturedCall(lambda x: x + 1, [torch.zeros(2)], capture=True)


# -------------------------------------------------------------------------------------- the loop
@pytest.fixture(scope="module")
def tiny_unet():
    parts = random_weights.components("tiny", seed=1)
    return parts.unet


def _loop_inputs(scheduler_name: str, steps: int, guidance: float, seed: int, batch: int = 1, strength: float = 1.0):
    sched = make_scheduler(scheduler_name, SD_SCHEDULER_CONFIG, eta=0.0)
    schedule = sched.set_timesteps(steps, device="cpu", strength=strength)
    start = 0 if strength == 1.0 else sched.start_index(steps, strength)
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 4, 8, 8, generator=g)
    n_ctx = 2 * batch if guidance > 1 else batch
    context = torch.randn(n_ctx, 77, 128, generator=g)
    noise = [torch.randn(batch, 4, 8, 8, generator=g) if (i >= start and need) else None
             for i, need in enumerate(schedule.noise_steps)]
    return sched, schedule, latents, context, start, noise


@pytest.mark.parametrize("scheduler, guidance, strength", [
    ("ddim", 7.5, 1.0), ("euler_a", 7.5, 1.0), ("dpmpp_2m", 1.0, 1.0), ("ddim", 5.0, 0.5), ("lcm", 1.0, 1.0)])
def test_uncaptured_graph_runner_equals_the_eager_loop(tiny_unet, scheduler, guidance, strength):
    graphs = DenoiseGraphs(GraphCache(), capture=False)
    sched, schedule, latents, context, start, noise = _loop_inputs(scheduler, 4, guidance, seed=0, strength=strength)
    eager = denoise(tiny_unet, sched, schedule, latents, context, guidance, start, noise)
    seen = []
    graphed = graphs(tiny_unet, sched, schedule, latents, context, guidance, start, noise, on_step=seen.append)
    assert torch.equal(graphed, eager)
    assert seen == list(range(start, len(schedule.timesteps)))


def test_same_key_reuses_the_capture_with_new_inputs(tiny_unet):
    graphs = DenoiseGraphs(GraphCache(), capture=False)
    for seed, guidance in ((0, 7.5), (1, 3.0)):  # new noise, context and guidance scale: same key
        sched, schedule, latents, context, start, noise = _loop_inputs("euler_a", 3, guidance, seed)
        out = graphs(tiny_unet, sched, schedule, latents, context, guidance, start, noise)
        assert torch.equal(out, denoise(tiny_unet, sched, schedule, latents, context, guidance, start, noise))
    assert graphs.cache.captures == 1
    for change in (dict(steps=4), dict(scheduler_name="ddim"), dict(guidance=1.0), dict(batch=2)):
        args = dict(scheduler_name="euler_a", steps=3, guidance=7.5, seed=0) | change
        sched, schedule, latents, context, start, noise = _loop_inputs(**args)
        graphs(tiny_unet, sched, schedule, latents, context, args["guidance"], start, noise)
    assert graphs.cache.captures == 5


def test_key_holds_every_static_input_and_baked_in_setting(tiny_unet):
    graphs = DenoiseGraphs(GraphCache(), capture=False)
    sched, schedule, latents, context, start, noise = _loop_inputs("ddim", 5, 7.5, 0, batch=2, strength=0.6)
    args = (sched, schedule, latents, context, 7.5, start, noise)
    key = graphs.key(tiny_unet, *args)
    assert key == graphs.key(tiny_unet, sched, schedule, latents.clone(), context.clone(), 3.0, start, noise)
    signature = {name: (shape, dtype) for name, shape, dtype, _ in key.inputs}
    assert signature["context"] == ((4, 77, 128), "float32") and signature["latents"] == ((2, 4, 8, 8), "float32")
    assert (key.scheduler, key.eta, key.cfg, key.start, key.condition, key.blend) == ("ddim", 0.0, True, 2, False,
                                                                                      False)
    other_settings = {
        "context length": graphs.key(tiny_unet, sched, schedule, latents, context[:, :20], 7.5, start, noise),
        "context dtype": graphs.key(tiny_unet, sched, schedule, latents, context.double(), 7.5, start, noise),
        "latents dtype": graphs.key(tiny_unet, sched, schedule, latents.double(), context, 7.5, start, noise),
        "prediction type": graphs.key(tiny_unet, make_scheduler("ddim", dict(SD_SCHEDULER_CONFIG,
                                                                              prediction_type="v_prediction")),
                                      *args[1:]),
        "clip range": graphs.key(tiny_unet, make_scheduler("ddim", dict(SD_SCHEDULER_CONFIG, clip_sample=True,
                                                                         clip_sample_range=2.0)), *args[1:]),
        "eta": graphs.key(tiny_unet, make_scheduler("ddim", SD_SCHEDULER_CONFIG, eta=0.5), *args[1:]),
        "guidance off": graphs.key(tiny_unet, *args[:4], 1.0, *args[5:]),
        "another U-Net": graphs.key(copy.deepcopy(tiny_unet), *args),
    }
    for what, other in other_settings.items():
        assert other != key, what


def test_captured_call_refuses_a_dtype_or_device_it_was_not_made_for():
    call = CapturedCall(lambda x: x * 2, [torch.ones(3)], capture=False)
    with pytest.raises(sdrt.InvalidInputError, match="float64"):
        call(torch.ones(3, dtype=torch.float64))  # copy_ would have cast it silently
    with pytest.raises(sdrt.InvalidInputError, match="meta"):
        call(torch.ones(3, device="meta"))


# ----------------------------------------------------------------------------------- in the pipeline
@pytest.fixture(scope="module")
def tiny_pipe():
    return from_components(random_weights.components("tiny", seed=2), device="cpu", dtype="float32")


@pytest.mark.parametrize("mode", ["txt2img", "img2img", "inpaint"])
def test_pipeline_with_the_graph_runner_matches_eager(tiny_pipe, mode):
    extra = {}
    if mode != "txt2img":
        extra["image"] = (torch.rand(16, 16, 3) * 255).to(torch.uint8).numpy()
        extra["strength"] = 0.7
    if mode == "inpaint":
        mask = torch.zeros(16, 16, dtype=torch.uint8)
        mask[4:12, 4:12] = 255
        extra["mask"] = mask.numpy()
    settings = dict(prompt="a red cube", steps=4, seed=3, output="np", scheduler="euler_a", **extra)
    tiny_pipe.denoiser = denoise
    eager = tiny_pipe(**settings)
    tiny_pipe.denoiser = DenoiseGraphs(GraphCache(), capture=False)
    try:
        graphed = tiny_pipe(**settings)
    finally:
        tiny_pipe.denoiser = denoise
    assert torch.equal(graphed.latents, eager.latents)


def _outcome(pipe, kwargs):
    try:
        return pipe(**kwargs).latents
    except sdrt.SdrtError as e:
        return type(e)


def test_graph_runner_accepts_and_rejects_exactly_what_the_eager_loop_does(tiny_pipe):
    """One graph runner across a sequence of calls (so earlier captures are cached when later inputs come):
    every call gives the eager loop's latents bit for bit, or the same error type."""
    width = tiny_pipe.unet.config.cross_attention_dim
    g = torch.Generator().manual_seed(0)

    def embeds(batch, length, dim=width):
        return torch.randn(batch, length, dim, generator=g)

    cases = [dict(prompt="a red cube"),
             dict(prompt_embeds=embeds(1, 77), guidance_scale=1.0),
             dict(prompt_embeds=embeds(1, 20), guidance_scale=1.0),            # another context length
             dict(prompt_embeds=embeds(1, 20), negative_prompt_embeds=embeds(1, 20)),
             dict(prompt_embeds=embeds(1, 20)),                                # the "" negative has 77 tokens
             dict(prompt_embeds=embeds(1, 77, width + 1), guidance_scale=1.0),  # wrong width
             dict(prompt_embeds=embeds(1, 77).double(), guidance_scale=1.0),   # cast to the model dtype
             dict(prompt="a red cube", num_images=2)]
    graphed = DenoiseGraphs(GraphCache(max_entries=16), capture=False)
    outcomes = []
    try:
        for case in cases:
            settings = dict(steps=2, seed=1, output="latent", **case)
            tiny_pipe.denoiser = denoise
            eager = _outcome(tiny_pipe, settings)
            tiny_pipe.denoiser = graphed
            got = _outcome(tiny_pipe, settings)
            same = torch.equal(got, eager) if torch.is_tensor(eager) and torch.is_tensor(got) else got is eager
            outcomes.append((sorted(case), "ok" if torch.is_tensor(eager) else eager.__name__, same))
    finally:
        tiny_pipe.denoiser = denoise
    assert all(same for _, _, same in outcomes), outcomes
    assert [kind for _, kind, _ in outcomes].count("ok") == 6, outcomes  # and two are refused by both


def test_warmup_fills_the_cache_for_the_real_call(tiny_pipe):
    tiny_pipe.denoiser = DenoiseGraphs(GraphCache(), capture=False)
    try:
        timings = tiny_pipe.warmup(num_images=2, steps=3)
        assert "denoise" in timings and tiny_pipe.denoiser.cache.captures == 1
        tiny_pipe("a blue sphere", num_images=2, steps=3, seed=5, output="latent")
        assert tiny_pipe.denoiser.cache.captures == 1
    finally:
        tiny_pipe.denoiser = denoise


def test_cuda_graphs_need_cuda():
    with pytest.raises(sdrt.InvalidInputError, match="cuda_graphs"):
        from_components(random_weights.components("tiny"), device="cpu", cuda_graphs=True)
    with pytest.raises(sdrt.InvalidInputError, match="cuda_graphs"):
        from_components(random_weights.components("tiny"), device="cpu", cuda_graphs="yes")


# ------------------------------------------------------------------------------------------ CUDA only
@requires_cuda
def test_captured_call_replays_with_new_inputs():
    call = CapturedCall(lambda x, y: (x @ y).relu(), [torch.randn(64, 64, device="cuda")] * 2, capture=True)
    assert call.captured and call.nbytes > 0
    for seed in range(3):
        x, y = torch.randn(2, 64, 64, device="cuda", generator=torch.Generator("cuda").manual_seed(seed))
        torch.testing.assert_close(call(x, y), (x @ y).relu(), rtol=0, atol=0)


@requires_cuda
@pytest.mark.parametrize("scheduler", ["ddim", "euler_a", "dpmpp_2m"])
def test_captured_loop_equals_the_eager_loop_on_cuda(tiny_unet, scheduler):
    unet = copy.deepcopy(tiny_unet).cuda()
    graphs = DenoiseGraphs(GraphCache.for_device(torch.device("cuda")), capture=True)
    for seed in (0, 1):
        sched, schedule, latents, context, start, noise = _loop_inputs(scheduler, 4, 7.5, seed)
        schedule = sched.set_timesteps(4, device="cuda")
        latents, context = latents.cuda(), context.cuda()
        noise = [None if n is None else n.cuda() for n in noise]
        with torch.inference_mode():
            eager = denoise(unet, sched, schedule, latents, context, 7.5, start, noise)
            graphed = graphs(unet, sched, schedule, latents, context, 7.5, start, noise)
        # same kernels on the same values; only cuBLAS/cuDNN algorithm choice may differ between runs
        torch.testing.assert_close(graphed, eager, rtol=1e-5, atol=1e-5)
    assert graphs.cache.captures == 1

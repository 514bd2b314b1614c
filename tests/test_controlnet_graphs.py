"""ControlNets in the graphed denoising loop (`sdrt.graphs.DenoiseGraphs`) and on the triton backend.

On a CPU the graph runner runs uncaptured on its static buffers (`capture=False`): that proves it computes
exactly (bit for bit) what the eager loop computes, and that its key holds what a capture would bake in. The
triton backend runs in Triton's interpreter on a CPU (one step, 8x8 pixels, no CFG) against the torch backend."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import sdrt
from controlnet_factories import control_picture, save_controlnet
from factories import save_pipeline
from sdrt.control import DEFAULT_SCALES, ControlResiduals, check_control
from sdrt.denoise import denoise
from sdrt.graphs import DenoiseGraphs, GraphCache


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("controlnet-graphs")
    save_pipeline(root / "sd1", "sd1")
    for seed in (1, 2):
        save_controlnet(root / f"cn{seed}", seed)
    return root


@pytest.fixture(scope="module")
def pipe(files):
    return sdrt.load(files / "sd1", device="cpu", dtype="float32", controlnet=[files / "cn1", files / "cn2"])


def _control(pipe, images=None, start=0.0, end=1.0, scale=1.0, guess=False, cfg=True, steps=4) -> ControlResiduals:
    images = images or [control_picture(seed=11), control_picture(seed=12)]
    request = check_control(2, images, scale, start, end, guess, DEFAULT_SCALES["txt2img"])
    return ControlResiduals(pipe.controlnets, request, 1, cfg, 0, steps, pipe.device, pipe.dtype)


def test_the_key_holds_what_a_capture_bakes_in_and_not_the_images(pipe):
    from sdrt.schedulers import make_scheduler

    sched = make_scheduler("ddim", pipe.scheduler_config, 0.0)
    schedule = sched.set_timesteps(4, device="cpu")
    g = torch.Generator().manual_seed(0)
    latents, context = torch.randn(1, 4, 8, 8, generator=g), torch.randn(2, 77, 128, generator=g)
    graphs = DenoiseGraphs(GraphCache(), capture=False)

    def key(control):
        return graphs.key(pipe.unet, sched, schedule, latents, context, 7.5, 0, [None] * 4, control=control)

    base = key(_control(pipe))
    assert base == key(_control(pipe, images=[control_picture(seed=3), control_picture(seed=4)]))  # new pictures
    names = [name for name, *_ in base.inputs]
    assert names[-2:] == ["control.image[0]", "control.image[1]"]
    others = {
        "no ControlNet": key(None),
        "a scale": key(_control(pipe, scale=[1.0, 0.5])),
        "guidance start": key(_control(pipe, start=0.5)),
        "guidance end": key(_control(pipe, end=[1.0, 0.5])),
        "guess mode": key(_control(pipe, guess=True)),
        "image size": key(_control(pipe, images=[control_picture(24)] * 2)),
    }
    for what, other in others.items():
        assert other != base, what
    swapped = _control(pipe)
    swapped.nets = swapped.nets[::-1]
    assert key(swapped) != base  # other ControlNet objects


@pytest.mark.parametrize("mode", ["txt2img", "img2img", "inpaint"])
def test_uncaptured_graphed_loop_equals_the_eager_loop(pipe, mode):
    rng = np.random.default_rng(0)
    extra = {}
    if mode != "txt2img":
        extra.update(image=rng.integers(0, 256, (16, 16, 3), dtype=np.uint8), strength=0.7)
    if mode == "inpaint":
        extra["mask"] = np.zeros((16, 16), dtype=np.uint8)
        extra["mask"][4:12, 4:12] = 255
    settings = dict(prompt="a red cube", negative_prompt="blurry", steps=4, seed=3, output="latent",
                    scheduler="euler_a", controlnet_conditioning_scale=[0.8, 1.2], control_guidance_end=[1.0, 0.5],
                    **extra)
    pictures = [[control_picture(seed=11), control_picture(seed=12)], [control_picture(seed=5)] * 2]
    pipe.denoiser = denoise
    eager = [pipe(**settings, control_image=p).latents for p in pictures]
    graphs = DenoiseGraphs(GraphCache(), capture=False)
    pipe.denoiser = graphs
    try:
        graphed = [pipe(**settings, control_image=p).latents for p in pictures]
        assert graphs.cache.captures == 1  # the second pictures replayed the first capture
        pipe(**settings, control_image=pictures[0], guess_mode=True)
        assert graphs.cache.captures == 2
    finally:
        pipe.denoiser = denoise
    for e, g in zip(eager, graphed):
        assert torch.equal(g, e)
    assert not torch.equal(eager[0], eager[1])


def test_triton_backend_matches_the_torch_backend(files):
    """Triton's interpreter on a CPU (compiled on CUDA): one step, 8x8 pixels, no CFG, one ControlNet (the
    interpreter runs every kernel program in Python; several ControlNets are the torch tests' matter)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    nets = files / "cn1"
    settings = dict(prompt="a red cube", steps=1, guidance_scale=1.0, seed=0, output="latent",
                    control_image=control_picture(8, seed=11), controlnet_conditioning_scale=0.8)
    ref = sdrt.load(files / "sd1", device=device, dtype="float32", controlnet=nets)(**settings)
    pipe = sdrt.load(files / "sd1", backend="triton", device=device, dtype="float32", controlnet=nets)
    assert pipe.controlnets[0].module.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    out = pipe(**settings)
    # fp32 both ways: only the kernels' summation order differs (as tests/test_triton_backend.py bounds it)
    scale = ref.latents.abs().max().item()
    assert (out.latents - ref.latents).abs().max().item() <= 1e-5 * scale

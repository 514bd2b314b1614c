"""The bundled tiny model: diffusers loads it unchanged and agrees with sdrt, and the text really steers
the picture (color, background and shape follow the prompt), img2img keeps the layout, inpainting
repaints only the mask.

The 24 evaluation prompts are drawn with their own seed and were never used to tune training."""
from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
import torch

import sdrt
from sdrt.components import BUNDLED_MODEL
from sdrt.tiny import shapes
from shape_analysis import analyse

STEPS, GUIDANCE = 25, 5.0
N_PROMPTS = 24


def _evaluation_scenes() -> list[tuple[str, str, str]]:
    combos = [(s, c, b) for s, c, b in itertools.product(shapes.SHAPES, shapes.COLORS, shapes.COLORS) if c != b]
    return random.Random(20261122).sample(combos, N_PROMPTS)


SCENES = _evaluation_scenes()


@pytest.fixture(scope="module")
def pipe():
    return sdrt.load()


@pytest.fixture(scope="module")
def guided(pipe):
    prompts = [shapes.caption(*s) for s in SCENES]
    result = pipe(prompts, steps=STEPS, guidance_scale=GUIDANCE, seed=list(range(N_PROMPTS)), output="np")
    return [analyse((img * 255).round().astype(np.uint8)) for img in result.images]


def test_bundled_model_is_small():
    size = sum(f.stat().st_size for f in BUNDLED_MODEL.rglob("*") if f.is_file())
    assert size <= 20 * 2**20, f"bundled model is {size / 2**20:.1f} MB"


def test_diffusers_loads_it_unchanged_and_agrees(pipe):
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.StableDiffusionPipeline.from_pretrained(str(BUNDLED_MODEL), safety_checker=None,
                                                           requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    prompt, seed = "a yellow triangle on a black background", 3
    expected = ref(prompt, num_inference_steps=STEPS, guidance_scale=GUIDANCE, output_type="np",
                   generator=torch.Generator("cpu").manual_seed(seed)).images
    got = pipe(prompt, steps=STEPS, guidance_scale=GUIDANCE, seed=seed, output="np").images
    assert np.abs(got - expected).max() <= 2 / 255


def test_text_steers_colors_and_shapes(guided):
    colors = np.mean([a.color == c and a.background == b for a, (_, c, b) in zip(guided, SCENES)])
    kinds = np.mean([a.shape == s for a, (s, _, _) in zip(guided, SCENES)])
    assert colors >= 0.90, f"shape and background colors right in {colors:.0%} of images"
    assert kinds >= 0.75, f"shape kind right in {kinds:.0%} of images"


def test_without_text_colors_fall_to_chance(pipe, guided):
    result = pipe([""] * N_PROMPTS, steps=STEPS, guidance_scale=1.0, seed=list(range(N_PROMPTS)), output="np")
    unguided = [analyse((img * 255).round().astype(np.uint8)) for img in result.images]
    colors = np.mean([a.color == c and a.background == b for a, (_, c, b) in zip(unguided, SCENES)])
    # chance of guessing both colors is 1/30; the guided test above demands >= 90%
    assert colors <= 0.25, f"unguided images still match the prompts' colors in {colors:.0%} of cases"


def _scene_image(scene: shapes.Scene) -> np.ndarray:
    return shapes.render(scene)


def test_img2img_keeps_the_object_in_place(pipe):
    rng = np.random.default_rng(11)
    for index in range(4):
        scene = shapes.random_scene(rng)
        source = analyse(_scene_image(scene))
        out = pipe(scene.caption, image=_scene_image(scene), strength=0.3, steps=STEPS, guidance_scale=GUIDANCE,
                   seed=index, output="np").images[0]
        got = analyse((out * 255).round().astype(np.uint8))
        assert got.centroid is not None, f"img2img lost the object of {scene}"
        moved = np.hypot(got.centroid[0] - source.centroid[0], got.centroid[1] - source.centroid[1])
        assert moved <= 4.0, f"object moved {moved:.1f} px in {scene}"


def test_inpainting_repaints_only_the_masked_half(pipe):
    scene = shapes.Scene("square", "red", "blue", cx=32, cy=32, radius=18)
    image = _scene_image(scene)
    mask = np.zeros((64, 64), np.uint8)
    mask[:, :32] = 255  # white = repaint the left half
    yellow = np.array(shapes.COLORS["yellow"], np.float32)
    before = np.linalg.norm(image[:, :32].reshape(-1, 3).mean(axis=0) - yellow)
    for seed in (0, 1):
        out = pipe("a red square on a yellow background", image=image, mask=mask, strength=1.0, steps=STEPS,
                   guidance_scale=GUIDANCE, seed=seed, output="np").images[0]
        out = (out * 255).round().astype(np.uint8)
        # the right half is the input's, exactly (sdrt composites the unmasked pixels back)
        assert np.array_equal(out[:, 32:], image[:, 32:])
        # the masked half moved most of the way to the prompt's new background color
        after = np.linalg.norm(out[:, :32].reshape(-1, 3).astype(np.float32).mean(axis=0) - yellow)
        assert after < 0.5 * before, f"seed {seed}: masked half is {after:.0f} from yellow, was {before:.0f}"

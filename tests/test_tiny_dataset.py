"""The bundled model's synthetic dataset, its vocabulary, and the analyser the semantic tests rely on."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sdrt.tiny import shapes
from sdrt.tiny.train import WORDS
from sdrt.tiny.vocab import write_tokenizer
from sdrt.tokenizer import CLIPTokenizer
from shape_analysis import analyse


def test_analyser_reads_rendered_scenes_exactly():
    rng = np.random.default_rng(5)
    for _ in range(200):
        scene = shapes.random_scene(rng)
        got = analyse(shapes.render(scene))
        assert (got.shape, got.color, got.background) == (scene.shape, scene.color, scene.background), scene
        assert abs(got.centroid[0] - scene.cx) < 1.5 or scene.shape == "triangle"


def test_scenes_vary_and_stay_inside_the_frame():
    rng = np.random.default_rng(0)
    scenes = [shapes.random_scene(rng) for _ in range(300)]
    assert {s.shape for s in scenes} == set(shapes.SHAPES)
    assert {s.color for s in scenes} == {s.background for s in scenes} == set(shapes.COLORS)
    assert all(s.color != s.background for s in scenes)
    for s in scenes:
        assert shapes.shape_mask(s)[[0, -1], :].max() == 0 and shapes.shape_mask(s)[:, [0, -1]].max() == 0
    images, captions = shapes.batch(rng, 4)
    assert images.shape == (4, 3, 64, 64) and images.min() >= -1 and images.max() <= 1
    assert captions[0].startswith("a ") and captions[0].endswith(" background")


def test_vocabulary_encodes_caption_words_whole_and_matches_transformers(tmp_path):
    size = write_tokenizer(tmp_path, WORDS)
    ours = CLIPTokenizer.from_folder(tmp_path)
    ids = ours("a red circle on a blue background")[0]
    assert ids[:9].tolist()[0] == ours.bos_token_id and ids[8] == ours.eos_token_id  # 7 words, 7 tokens
    assert ours.vocab_size == size
    transformers = pytest.importorskip("transformers")
    ref = transformers.CLIPTokenizer.from_pretrained(str(tmp_path))
    prompts = ["a red circle on a blue background", "A Purple hexagon, please!", "", "ünïcode 😀 words"]
    expected = ref(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(ours(prompts), expected)


def test_training_script_writes_a_folder_sdrt_and_diffusers_load(tmp_path):
    import sdrt
    from sdrt.tiny.train import main

    out = tmp_path / "model"
    assert main(["--out", str(out), "--vae-steps", "2", "--unet-steps", "2", "--dataset-size", "16",
                 "--batch-size", "4", "--work", str(tmp_path / "work")]) == 0
    assert (tmp_path / "work" / "vae.safetensors").is_file()  # the stage cache a later run can reuse
    result = sdrt.load(out)("a red circle on a blue background", steps=2, seed=0, output="np")
    assert result.images.shape == (1, 64, 64, 3)
    diffusers = pytest.importorskip("diffusers")
    diffusers.StableDiffusionPipeline.from_pretrained(str(out))

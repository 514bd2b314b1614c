"""`sdrt generate --controlnet PATH --control-image IMG [--control-preprocess NAME] [--control-scale S]`, end to end
on tiny random models: the PNG is the pipeline's own picture for the same arguments, its parameters record the
ControlNets, and bad combinations are one-line refusals (exit 2) before any work."""
from __future__ import annotations

import numpy as np
import PIL.Image
import pytest

import sdrt
from cli_run import assert_refused, sdrt as run_sdrt
from controlnet_factories import control_picture, save_controlnet
from factories import save_pipeline
from sdrt.png import read_parameters


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-controlnet")
    save_pipeline(root / "model", "sd1")
    save_controlnet(root / "cn1", 1)
    save_controlnet(root / "cn2", 2)
    save_controlnet(root / "other", 3, cross_attention_dim=64)
    control_picture().save(root / "edges.png")
    rng = np.random.default_rng(0)
    PIL.Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / "photo.png")
    return root


def test_two_controlnets_with_a_preprocessor_match_the_pipeline(files, tmp_path):
    out = tmp_path / "out.png"
    run = run_sdrt("generate", "a cat", "-o", out, "--model", files / "model", "--steps", 2, "--seed", 5,
                   "--device", "cpu", "--controlnet", files / "cn1", "--controlnet", files / "cn2",
                   "--control-image", files / "photo.png", "--control-image", files / "edges.png",
                   "--control-preprocess", "canny", "--control-preprocess", "none",
                   "--control-scale", 0.7, "--control-scale", 1.2)
    assert run.returncode == 0, run.stderr
    params = read_parameters(out)
    assert [(c["path"], c["image"], c["preprocess"], c["scale"]) for c in params["controlnets"]] == [
        (str(files / "cn1"), str(files / "photo.png"), "canny", 0.7),
        (str(files / "cn2"), str(files / "edges.png"), "none", 1.2)]
    pipe = sdrt.load(files / "model", device="cpu", controlnet=[files / "cn1", files / "cn2"])
    expected = pipe("a cat", steps=2, seed=5, control_image=[PIL.Image.open(files / "photo.png").convert("RGB"),
                                                              PIL.Image.open(files / "edges.png").convert("RGB")],
                    control_preprocess=["canny", None], controlnet_conditioning_scale=[0.7, 1.2]).images[0]
    assert np.array_equal(np.asarray(PIL.Image.open(out).convert("RGB")), np.asarray(expected))


@pytest.mark.parametrize("args,words", [
    (["--control-image", "{edges}"], ["--control-image need", "--controlnet PATH"]),
    (["--controlnet", "{cn1}"], ["one --control-image per --controlnet (1), got 0"]),
    (["--controlnet", "{cn1}", "--control-image", "{edges}", "--control-preprocess", "sobel"],
     ["--control-preprocess", "unknown control preprocessor 'sobel'"]),
    (["--controlnet", "{cn1}", "--controlnet", "{cn2}", "--control-image", "{edges}", "--control-image", "{edges}",
      "--control-scale", 1, "--control-scale", 1, "--control-scale", 1], ["--control-scale must be given once or "
                                                                           "once per --controlnet (2), got 3"]),
    (["--controlnet", "/nonexistent/cn"], ["--controlnet", "no such file or folder"]),
    (["--controlnet", "{cn1}", "--control-image", "/nonexistent.png"], ["--control-image", "no such file"]),
    (["--controlnet", "{other}", "--control-image", "{edges}"],
     ["was made for another base model: its cross_attention_dim is 64", "'s is 128"]),
    (["--controlnet", "{cn1}", "--control-image", "{edges}", "--size", "24x16"],
     ["control_image is 16x16 but the output is 24x16"]),
])
def test_bad_control_arguments_are_one_line_errors(files, tmp_path, args, words):
    names = {"edges": files / "edges.png", "cn1": files / "cn1", "cn2": files / "cn2", "other": files / "other"}
    args = [str(a).format(**{k: str(v) for k, v in names.items()}) for a in args]
    run = run_sdrt("generate", "a cat", "-o", tmp_path / "out.png", "--model", files / "model", "--steps", 1,
                   "--device", "cpu", *args)
    assert_refused(run, tmp_path, *words)

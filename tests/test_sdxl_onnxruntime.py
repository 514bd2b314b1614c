"""SDXL on the `onnxruntime` backend: both text encoders and the U-Net with text_embeds/time_ids exported
(dynamic batch, size and context length), the export cache keyed on every weight including the second
encoder's, and pictures within 2/255 of the `torch` backend (base txt2img with CFG, the refiner's img2img)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import sdrt
from sdrt.errors import InvalidInputError
from sdrt.export.graph_components import GraphSDXLTextEncoder2, GraphUNet
from sdrt.export.onnx import default_export_dir, export_onnx
from sdrt.components import load_components
from sdxl_factories import save_sdxl

pytest.importorskip("onnxruntime")

IMAGE_TOL = 2 / 255


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """"base" / "refiner" -> (torch pipeline, onnxruntime pipeline, folder)."""
    root = tmp_path_factory.mktemp("sdxl_ort")
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SDRT_CACHE", str(root / "cache"))
        for name in ("base", "refiner"):
            save_sdxl(root / name, refiner=name == "refiner")
            out[name] = (sdrt.load(root / name, backend="torch"), sdrt.load(root / name, backend="onnxruntime"),
                         root / name)
        yield out


def test_export_holds_both_encoders_and_the_conditioned_unet(models):
    ort_pipe = models["base"][1]
    assert isinstance(ort_pipe.text_encoder_2, GraphSDXLTextEncoder2) and isinstance(ort_pipe.unet, GraphUNet)
    base = load_components(models["base"][2])
    export = export_onnx(base)  # the backend's cached export, found again by the weights' digest
    assert export.directory == default_export_dir(base)
    assert set(export.components) == {"text_encoder", "text_encoder_2", "unet", "vae_encoder", "vae_decoder"}
    unet = export.manifest["components"]["unet"]["inputs"]
    assert unet["text_embeds"]["shape"] == ["batch", 32] and unet["time_ids"]["shape"] == ["batch", 6]
    assert unet["encoder_hidden_states"]["shape"] == ["batch", "text_length", 128]
    outputs = export.manifest["components"]["text_encoder_2"]["outputs"]
    assert outputs == {"penultimate_hidden_state": {"dtype": "float32", "shape": ["batch", 77, 64]},
                       "text_embeds": {"dtype": "float32", "shape": ["batch", 32]}}
    refiner = load_components(models["refiner"][2])
    refiner_export = export_onnx(refiner)
    assert set(refiner_export.components) == {"text_encoder_2", "unet", "vae_encoder", "vae_decoder"}
    assert refiner_export.manifest["components"]["unet"]["inputs"]["time_ids"]["shape"] == ["batch", 5]
    # the second encoder's weights are part of the cache key
    with torch.no_grad():
        refiner.text_encoder_2.text_projection.weight.add_(1.0)
    assert default_export_dir(refiner) != refiner_export.directory


@pytest.mark.parametrize("guidance", [1.0, 5.0])
def test_base_txt2img_matches_torch_backend(models, guidance):
    torch_pipe, ort_pipe, _ = models["base"]
    kwargs = dict(prompt=["a red cube", "a cat"], negative_prompt="blurry", guidance_scale=guidance, height=16, width=24,
                  steps=3, seed=3, output="np")
    ref, got = torch_pipe(**kwargs), ort_pipe(**kwargs)
    assert got.images.shape == ref.images.shape == (2, 16, 24, 3)
    assert np.abs(got.images - ref.images).max() <= IMAGE_TOL


def test_refiner_img2img_matches_torch_backend(models):
    torch_pipe, ort_pipe, _ = models["refiner"]
    image = (np.arange(16 * 16 * 3).reshape(16, 16, 3) % 251).astype(np.uint8)
    kwargs = dict(prompt="a red cube", image=image, strength=0.6, guidance_scale=5.0, steps=4, seed=5, output="np")
    ref, got = torch_pipe(**kwargs), ort_pipe(**kwargs)
    assert np.abs(got.images - ref.images).max() <= IMAGE_TOL


def test_a_two_chunk_weighted_prompt_matches_torch_backend(models):
    torch_pipe, ort_pipe, _ = models["base"]
    prompt = "a (red:1.3) cube, " * 30  # 120 tokens: two chunks through both exported encoders
    assert torch_pipe._encode_text([prompt])[0].shape[1] == 2 * 77
    kwargs = dict(prompt=prompt, negative_prompt="[blurry]", guidance_scale=5.0, steps=3, seed=4, output="np")
    ref, got = torch_pipe(**kwargs), ort_pipe(**kwargs)
    assert np.abs(got.images - ref.images).max() <= IMAGE_TOL
    with pytest.raises(InvalidInputError, match="clip_skip needs the torch backend"):
        ort_pipe("a cube", steps=1, clip_skip=1)


def test_tensorrt_refuses_sdxl_in_one_line(models):
    with pytest.raises(InvalidInputError, match="SDXL runs on the torch, triton, onnxruntime, openvino backend so far, "
                                                "got backend='tensorrt'"):
        sdrt.load(models["base"][2], backend="tensorrt")


@pytest.mark.parametrize("name", ["base", "refiner"])
def test_sdrt_check_passes_for_sdxl_on_onnxruntime(models, name, tmp_path, capsys):
    from sdrt.cli import main
    out = tmp_path / "check.json"
    code = main(["check", "--model", str(models[name][2]), "--backend", "onnxruntime", "--device", "cpu",
                 "--steps", "3", "--prompt", "a red cube", "--size", "16", "--json", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    report = json.loads(out.read_text())
    assert report["passed"] is True and [r["component"] for r in report["rows"]] == ["text_encoder", "unet",
                                                                                   "vae_decode", "image"]
    assert all(0 < r["backend"]["max_abs"] <= r["max_abs_limit"] for r in report["rows"][:2])


def test_sdrt_export_cli_writes_every_sdxl_component_and_build_reads_its_contracts(models, tmp_path, capsys):
    from sdrt.cli import main
    from sdrt.cli.build import _contracts_from_manifest
    from sdrt.export.onnx import read_export
    assert main(["export", "--model", str(models["refiner"][2]), "--out", str(tmp_path / "onnx")]) == 0
    export = read_export(tmp_path / "onnx")
    assert set(export.components) == {"text_encoder_2", "unet", "vae_encoder", "vae_decoder"}
    contracts = _contracts_from_manifest(export)  # what `sdrt build` profiles, from the manifest's configs only
    assert set(contracts) == set(export.components)
    assert contracts["unet"].input_names[-2:] == ("text_embeds", "time_ids")

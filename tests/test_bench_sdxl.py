"""`sdrt bench --model random:tiny-sdxl` on the CPU: sdrt beside diffusers' StableDiffusionXLPipeline on the same
random weights, and the configs of `random:sdxl` (the GPU suite's SDXL row) against SDXL base 1.0's.
Target: < 30 s on 2 CPU cores."""
from __future__ import annotations

import json

import pytest
import torch

from sdrt.bench.models import diffusers_pipeline
from sdrt.bench.prompt_inputs import diffusers_prompt_inputs, sdrt_prompt_inputs
from sdrt.bench.side_by_side import model_case, unet_tflop_per_step
from sdrt.cli import main
from sdrt.models import random_weights
from sdrt.models.clip import CLIPTextModel, CLIPTextModelWithProjection
from sdrt.models.unet import UNet
from sdrt.models.vae import AutoencoderKL
from sdrt.pipeline import from_components

LATENT_TOL = 1e-3  # issue 14's pipeline tolerance against diffusers


def test_bench_tiny_sdxl_runs_beside_diffusers_and_writes_json(tmp_path, capsys):
    code = main(["bench", "--model", "random:tiny-sdxl", "--device", "cpu", "--steps", "2", "--runs", "1",
                 "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "tiny-sdxl" in printed and "speedup (U-Net it/s) sdrt torch / diffusers eager" in printed
    result = json.loads(next(tmp_path.glob("bench-*.json")).read_text())
    assert result["complete"] and [r["name"] for r in result["rows"]] == ["sdrt torch", "diffusers eager"]
    for row in result["rows"]:
        assert row["skipped"] is None and row["model"] == "tiny-sdxl" and (row["size"], row["steps"]) == (16, 2)
        assert row["unet_its"] > 0 and row["latency_p50_s"] > 0 and row["tflop_per_step"] > 0


def test_both_sides_of_the_tiny_sdxl_bench_draw_the_same_picture():
    """The diffusers twin holds the same weights and gets the same prompt inputs: DDIM with CFG, same seed."""
    parts = random_weights.components("tiny-sdxl", seed=3)
    theirs_pipe = diffusers_pipeline(parts, "cpu", torch.float32)
    ours_pipe = from_components(parts, device="cpu", dtype="float32")
    ids = parts.tokenizer(["", "a red cube"])
    with torch.inference_mode():
        ours = ours_pipe(**sdrt_prompt_inputs(ours_pipe, ids, 1), steps=3, guidance_scale=5.0, seed=1,
                         output="latent").latents
        theirs = theirs_pipe(**diffusers_prompt_inputs(theirs_pipe, ids, 1), num_inference_steps=3,
                             guidance_scale=5.0, generator=torch.Generator("cpu").manual_seed(1),
                             output_type="latent").images
    assert (ours - theirs).abs().max().item() <= LATENT_TOL


def test_random_sdxl_is_sdxl_base_at_1024():
    first, second, ucfg, vcfg, _ = random_weights.SDXL_CONFIGS["sdxl"]
    with torch.device("meta"):  # parameter counts of SDXL base 1.0's four models
        counts = [sum(p.numel() for p in cls(cfg).parameters()) for cls, cfg in
                  ((CLIPTextModel, first), (CLIPTextModelWithProjection, second), (UNet, ucfg), (AutoencoderKL, vcfg))]
    assert counts == [123_060_480, 694_659_840, 2_567_463_684, 83_653_863]
    case = model_case("sdxl", torch.device("cuda"), None, None)
    assert (case.size, case.steps, case.guidance, case.batch) == (1024, 30, 5.0, 1)
    # one CFG step at 128x128 latents, counted on the meta device: about 6.8 TFLOP per U-Net call
    assert unet_tflop_per_step("sdxl", case) == pytest.approx(13.52, abs=0.01)


@pytest.mark.parametrize("model", ["tiny-sdxl", "random:nope"])
def test_bench_model_must_be_a_random_config(model, capsys):
    assert main(["bench", "--model", model, "--device", "cpu", "--steps", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model" in err

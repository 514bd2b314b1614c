"""`sdrt generate --model <SDXL folder>` (the installed entry point): the model's native size by default (SDXL's
1024x1024; the tiny model's 16x16), the pipeline's own picture for the seed, SDXL's strength default recorded
in the PNG, and --vae."""
from __future__ import annotations

import numpy as np
import PIL.Image
import pytest

import sdrt
from cli_run import assert_refused, sdrt as run_sdrt
from sdrt.png import read_parameters
from sdxl_factories import save_sdxl


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl-cli")
    save_sdxl(root / "base")
    save_sdxl(root / "other", seed=5)
    return root / "base", root / "other" / "vae"


def test_generate_with_an_sdxl_folder(folders, tmp_path):
    base, other_vae = folders
    common = ["--model", base, "--steps", "4", "--seed", "3", "--guidance", "5", "--device", "cpu"]
    run = run_sdrt("generate", "a red fox", "-o", tmp_path / "fox.png", *common)
    assert run.returncode == 0, run.stderr
    picture = np.asarray(PIL.Image.open(tmp_path / "fox.png"))
    pipe = sdrt.load(base, device="cpu")
    expected = pipe("a red fox", steps=4, seed=3, guidance_scale=5.0).images[0]
    assert picture.shape == (16, 16, 3) and np.array_equal(picture, np.asarray(expected))

    run = run_sdrt("generate", "a red fox", "-o", tmp_path / "again.png", "--image", tmp_path / "fox.png",
                   "--vae", other_vae, *common)
    assert run.returncode == 0, run.stderr
    parameters = read_parameters(tmp_path / "again.png")
    assert parameters["strength"] == 0.3 and parameters["vae"] == str(other_vae.resolve())


def test_generate_refuses_a_vae_that_is_not_there(folders, tmp_path):
    base, _ = folders
    run = run_sdrt("generate", "a red fox", "-o", tmp_path / "fox.png", "--model", base, "--device", "cpu",
                   "--vae", tmp_path / "missing")
    assert_refused(run, tmp_path, "vae not found", "missing")

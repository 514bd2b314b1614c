"""The real `sdrt` entry point in subprocesses: a PNG whose parameters regenerate it; bad input exits 2 with
one line and writes nothing. Argument errors answer before torch is imported, so most cases are fast."""
from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest

from factories import save_pipeline
from sdrt.png import read_parameters

SDRT = [shutil.which("sdrt") or sys.executable, *([] if shutil.which("sdrt") else ["-m", "sdrt.cli"])]


def sdrt(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([*SDRT, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-sd1")
    save_pipeline(path, "sd1")
    return path


def test_help_lists_subcommands():
    run = sdrt("--help")
    assert run.returncode == 0
    assert "generate" in run.stdout and "info" in run.stdout


def test_info_lists_versions_and_backends():
    run = sdrt("info")
    assert run.returncode == 0, run.stderr
    for word in ("torch", "triton", "onnxruntime", "tensorrt", "backends"):
        assert word in run.stdout
    assert any(line.split() == ["torch", "yes"] for line in run.stdout.splitlines())


def test_png_parameters_regenerate_the_same_image(model, tmp_path):
    first = tmp_path / "first.png"
    run = sdrt("generate", "a red cube", "-o", first, "--model", model, "--steps", 2, "--seed", 42,
               "--scheduler", "euler_a", "--negative", "blurry", "--guidance", 5, "--device", "cpu")
    assert run.returncode == 0, run.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["first.png"]  # no temporary file left behind
    params = read_parameters(first)
    assert params["seed"] == 42 and params["size"] == "16x16" and params["backend"] == "torch"

    again = tmp_path / "again.png"
    run = sdrt("generate", params["prompt"], "-o", again, "--model", params["model"], "--steps", params["steps"],
               "--seed", params["seed"], "--scheduler", params["scheduler"], "--negative", params["negative_prompt"],
               "--guidance", params["guidance"], "--eta", params["eta"], "--size", params["size"],
               "--backend", params["backend"], "--device", params["device"], "--dtype", params["dtype"])
    assert run.returncode == 0, run.stderr
    assert np.array_equal(np.asarray(PIL.Image.open(first)), np.asarray(PIL.Image.open(again)))


def _assert_refused(run: subprocess.CompletedProcess, folder, *words: str):
    assert run.returncode == 2, (run.returncode, run.stderr)
    message = run.stderr.strip()
    assert len(message.splitlines()) == 1, message
    for word in words:
        assert word in message, message
    assert not list(folder.glob("*.png")) and not list(folder.glob(".*tmp"))


@pytest.mark.parametrize("args, words", [
    (["--size", "100x64"], ["width", "multiple of 8"]),
    (["--size", "64x99999"], ["height"]),
    (["--num", "0"], ["num"]),
    (["--guidance", "-1"], ["guidance"]),
    (["--strength", "1.5", "--image", "in.png"], ["strength"]),
    (["--steps", "many"], ["steps"]),
    (["--prediction-type", "v"], ["prediction-type", "epsilon", "v_prediction"]),
])
def test_bad_arguments_exit_2_before_loading(tmp_path, args, words):
    _assert_refused(sdrt("generate", "x", "-o", tmp_path / "out.png", *args), tmp_path, *words)


def test_unwritable_output_exits_2(tmp_path):
    _assert_refused(sdrt("generate", "x", "-o", tmp_path / "missing" / "out.png"), tmp_path, "does not exist")
    _assert_refused(sdrt("generate", "x", "-o", tmp_path / "out.jpg"), tmp_path, ".png")
    # with --num the message names the path the user gave, not the first numbered name made from it
    _assert_refused(sdrt("generate", "x", "-o", tmp_path / "out", "--num", "2"), tmp_path, ".png",
                    f"{tmp_path / 'out'}'")


def test_missing_model_exits_2(tmp_path):
    _assert_refused(sdrt("generate", "x", "-o", tmp_path / "out.png", "--model", tmp_path / "nope"), tmp_path,
                    "model not found")


def test_mask_of_wrong_mode_exits_2(model, tmp_path):
    PIL.Image.new("RGB", (16, 16), (90, 20, 200)).save(tmp_path / "in.jpg")
    PIL.Image.new("RGBA", (16, 16)).save(tmp_path / "mask.webp")
    run = sdrt("generate", "x", "-o", tmp_path / "out.png", "--model", model, "--steps", 2, "--device", "cpu",
               "--image", tmp_path / "in.jpg", "--mask", tmp_path / "mask.webp")
    _assert_refused(run, tmp_path, "mask", "RGBA")


def test_image_and_mask_files_of_any_mode_are_converted(model, tmp_path):
    """An RGBA or 16-bit input and a palette or 16-bit mask are read as their pictures, not refused
    (the CLI user has no image.convert) and not clipped to white."""
    gray = np.random.default_rng(0).integers(0, 65536, (16, 16)).astype(np.uint16)
    PIL.Image.fromarray(gray).save(tmp_path / "in16.png")
    PIL.Image.new("RGBA", (16, 16), (90, 20, 200, 255)).save(tmp_path / "in_rgba.png")
    mask = np.zeros((16, 16), np.uint8)
    mask[:, 8:] = 255
    PIL.Image.fromarray(mask).convert("P").save(tmp_path / "mask_p.png")
    PIL.Image.fromarray(mask.astype(np.uint16) * 257).save(tmp_path / "mask16.png")
    for k, (image, mask_file) in enumerate([("in16.png", "mask_p.png"), ("in_rgba.png", "mask16.png")]):
        out = tmp_path / f"out{k}.png"
        run = sdrt("generate", "x", "-o", out, "--model", model, "--steps", 2, "--device", "cpu", "--seed", 1,
                   "--image", tmp_path / image, "--mask", tmp_path / mask_file, "--strength", 0.5)
        assert run.returncode == 0, run.stderr
        # inpainting keeps the input outside the mask: the left half is the input picture, unclipped
        written = np.asarray(PIL.Image.open(out).convert("RGB"))[:, :8].astype(int)
        expected = np.asarray(PIL.Image.open(tmp_path / image).convert("RGB") if image.endswith("rgba.png")
                              else PIL.Image.fromarray(np.round(gray / 257).astype(np.uint8)).convert("RGB"))[:, :8]
        assert np.abs(written - expected).max() <= 1


def test_image_file_is_read_upright_by_its_exif_orientation(model, tmp_path):
    """A camera JPEG stored sideways with an EXIF orientation tag is the picture its viewers show."""
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    PIL.Image.new("RGB", (24, 16), (90, 20, 200)).save(tmp_path / "photo.jpg", exif=exif)
    run = sdrt("generate", "x", "-o", tmp_path / "out.png", "--model", model, "--steps", 2, "--device", "cpu",
               "--image", tmp_path / "photo.jpg", "--strength", 0.5)
    assert run.returncode == 0, run.stderr
    assert PIL.Image.open(tmp_path / "out.png").size == (16, 24)


def test_unset_strength_is_the_modes_diffusers_default(model, tmp_path):
    PIL.Image.new("RGB", (16, 16), (90, 20, 200)).save(tmp_path / "in.png")
    PIL.Image.new("L", (16, 16), 255).save(tmp_path / "mask.png")
    for extra, expected in ((["--image", tmp_path / "in.png"], 0.8),
                            (["--image", tmp_path / "in.png", "--mask", tmp_path / "mask.png"], 1.0)):
        out = tmp_path / f"out-{expected}.png"
        run = sdrt("generate", "x", "-o", out, "--model", model, "--steps", 2, "--device", "cpu", "--seed", 1, *extra)
        assert run.returncode == 0, run.stderr
        assert read_parameters(out)["strength"] == expected

"""The real `sdrt` entry point in subprocesses: a PNG whose parameters regenerate it; bad input exits 2 with
one line and writes nothing. Argument errors answer before torch is imported, so most cases are fast."""
from __future__ import annotations

import os
import shutil
import struct
import zlib

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import load_file, save_file

from cli_run import assert_refused, sdrt
from factories import save_pipeline
from sdrt.components import BUNDLED_MODEL
from sdrt.png import read_parameters


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
    assert_refused(sdrt("generate", "x", "-o", tmp_path / "out.png", *args), tmp_path, *words)


def test_unwritable_output_exits_2(tmp_path):
    assert_refused(sdrt("generate", "x", "-o", tmp_path / "missing" / "out.png"), tmp_path, "does not exist")
    assert_refused(sdrt("generate", "x", "-o", tmp_path / "out.jpg"), tmp_path, ".png")
    # with --num the message names the path the user gave, not the first numbered name made from it
    assert_refused(sdrt("generate", "x", "-o", tmp_path / "out", "--num", "2"), tmp_path, ".png",
                    f"{tmp_path / 'out'}'")


def test_missing_model_exits_2(tmp_path):
    assert_refused(sdrt("generate", "x", "-o", tmp_path / "out.png", "--model", tmp_path / "nope"), tmp_path,
                    "model not found")


@pytest.mark.parametrize("args, words", [
    ([b"a red \xff\xfe circle"], ["prompt", "UTF-8", "0xff"]),
    ([b"x", b"--negative", b"blurry \xc3"], ["--negative", "UTF-8", "0xc3"]),
])
def test_prompt_bytes_that_are_not_utf8_exit_2(tmp_path, args, words):
    # argv bytes reach Python as lone surrogates (os.fsdecode), and go back out as the same bytes
    run = sdrt("generate", *map(os.fsdecode, args), "-o", tmp_path / "out.png")
    assert_refused(run, tmp_path, *words)


def test_terminal_escapes_in_paths_are_printed_escaped(tmp_path):
    run = sdrt("generate", "x", "-o", tmp_path / "out.png", "--model", "\x1b[2J\x1b[31mgone")
    message = assert_refused(run, tmp_path, "not found", "\\x1b[2J")
    assert "\x1b" not in message


def test_output_paths_too_long_or_ending_in_a_separator_exit_2_before_any_work(tmp_path):
    assert_refused(sdrt("generate", "x", "-o", tmp_path / ("a" * 296 + ".png")), tmp_path, "file name", "300 bytes")
    (tmp_path / "sub").mkdir()
    assert_refused(sdrt("generate", "x", "-o", f"{tmp_path / 'sub' / 'out.png'}/"), tmp_path / "sub", "separator")
    assert not list((tmp_path / "sub").iterdir())
    # with --num each numbered name must fit too: out-10.png is one byte longer than out-1.png
    assert_refused(sdrt("generate", "x", "-o", tmp_path / ("a" * 249 + ".png"), "--num", 10, "--steps", 1),
                   tmp_path, "file name", "256 bytes")


def test_longest_legal_file_name_is_written(tmp_path):
    """A 255-byte name: the temporary file beside it must not have a longer one."""
    out = tmp_path / ("a" * 251 + ".png")
    run = sdrt("generate", "a red circle on a blue background", "-o", out, "--steps", 1, "--seed", 0)
    assert run.returncode == 0, run.stderr
    assert [p.name for p in tmp_path.iterdir()] == [out.name]


def _huge_png(path, side: int) -> None:
    """A valid black bilevel PNG of side x side pixels, written row by row (a few MB of zlib work)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    packer = zlib.compressobj()
    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte + 1 bit per pixel
    data = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", data) + chunk(b"IEND", b""))


def test_huge_input_image_is_refused_from_its_header_in_one_line(tmp_path):
    images = tmp_path / "in"
    images.mkdir()
    _huge_png(images / "big.png", 10000)
    with pytest.warns(PIL.Image.DecompressionBombWarning):  # big enough for Pillow's own warning
        assert PIL.Image.open(images / "big.png").size == (10000, 10000)
    run = sdrt("generate", "x", "-o", tmp_path / "out.png", "--image", images / "big.png")
    assert_refused(run, tmp_path, "--image", "10000x10000", "4096")
    assert "Warning" not in run.stderr


@pytest.mark.parametrize("args, env, words", [
    (["--steps", 1000], {}, ["steps", "[1, 500]", "SDRT_MAX_STEPS"]),
    (["--num", 10000], {}, ["--num 10000", "max_images=64", "SDRT_MAX_IMAGES"]),
    (["--num", 3], {"SDRT_MAX_IMAGES": "2"}, ["max_images=2"]),
    (["--steps", 40], {"SDRT_MAX_STEPS": "30"}, ["[1, 30]"]),
    (["--size", "64x64"], {"SDRT_MAX_PIXELS": "4000"}, ["64x64", "max_pixels=4000", "SDRT_MAX_PIXELS"]),
    ([], {"SDRT_MAX_STEPS": "many"}, ["SDRT_MAX_STEPS", "'many'"]),
    ([], {"SDRT_MAX_IMAGES": "0"}, ["SDRT_MAX_IMAGES"]),
])
def test_limits_are_enforced_before_loading_and_set_by_the_environment(tmp_path, args, env, words):
    assert_refused(sdrt("generate", "x", "-o", tmp_path / "out.png", *args, env=env), tmp_path, *words)


def test_steps_at_the_stated_limit_run(tmp_path):
    run = sdrt("generate", "x", "-o", tmp_path / "out.png", "--steps", 25, "--seed", 0, env={"SDRT_MAX_STEPS": "25"})
    assert run.returncode == 0, run.stderr
    assert read_parameters(tmp_path / "out.png")["steps"] == 25


@pytest.mark.parametrize("args, words", [
    (["--size", 7], ["--size", "multiple of 8"]),
    (["--steps", 0], ["--steps"]),
    (["--steps", 501], ["--steps", "SDRT_MAX_STEPS"]),
    (["--prompt", os.fsdecode(b"a \xff")], ["--prompt", "UTF-8"]),
])
def test_check_refuses_bad_arguments_before_running(tmp_path, args, words):
    assert_refused(sdrt("check", *args), tmp_path, *words)


def test_check_json_path_is_checked_before_running(tmp_path):
    assert_refused(sdrt("check", "--json", tmp_path), tmp_path, "--json", "is a folder")
    (tmp_path / "file").write_text("")
    assert_refused(sdrt("check", "--json", tmp_path / "file" / "report.json"), tmp_path, "--json", "not a folder")
    assert_refused(sdrt("check", "--json", f"{tmp_path / 'report.json'}/"), tmp_path, "--json", "separator")


def test_nan_advice_fits_a_float32_run(tmp_path):
    """A model whose U-Net outputs inf: the run was float32, so the error must not advise float32."""
    model = tmp_path / "model"
    shutil.copytree(BUNDLED_MODEL, model)
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(weights))
    tensors["conv_out.bias"] = torch.full_like(tensors["conv_out.bias"], float("inf"))
    save_file(tensors, str(weights))
    run = sdrt("generate", "x", "-o", tmp_path / "out.png", "--model", model, "--steps", 1, "--dtype", "float32")
    message = assert_refused(run, tmp_path, "NaN or inf", "float32", "already float32")
    assert "try dtype='float32'" not in message


def test_mask_of_wrong_mode_exits_2(model, tmp_path):
    PIL.Image.new("RGB", (16, 16), (90, 20, 200)).save(tmp_path / "in.jpg")
    PIL.Image.new("RGBA", (16, 16)).save(tmp_path / "mask.webp")
    run = sdrt("generate", "x", "-o", tmp_path / "out.png", "--model", model, "--steps", 2, "--device", "cpu",
               "--image", tmp_path / "in.jpg", "--mask", tmp_path / "mask.webp")
    assert_refused(run, tmp_path, "mask", "RGBA")


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

"""Argument checking of `sdrt.load` and `Pipeline.__call__`, image/mask conversion, PNG writing."""
from __future__ import annotations

import os
import stat

import numpy as np
import PIL.Image
import pytest
import torch

import sdrt
from factories import save_pipeline
from sdrt.images import eight_bit, image_to_tensor, mask_to_tensor
from sdrt.png import read_parameters, save_png


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    path = tmp_path_factory.mktemp("sd1")
    save_pipeline(path, "sd1")
    return sdrt.load(path, device="cpu")


def _rgb(w=16, h=16):
    return PIL.Image.fromarray(np.random.default_rng(1).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("kwargs, words", [
    ({"height": 20}, ["height", "multiple of 8"]),
    ({"width": 8192}, ["width", "4096"]),
    ({"num_images": 0}, ["num_images"]),
    ({"steps": 0}, ["steps"]),
    ({"guidance_scale": -1.0}, ["guidance_scale"]),
    ({"guidance_scale": float("nan")}, ["guidance_scale"]),
    ({"strength": 1.5, "image": _rgb()}, ["strength", "[0, 1]"]),
    ({"strength": 0.1, "image": _rgb()}, ["strength"]),  # 0.1 * 2 steps leaves no step
    ({"image": _rgb().convert("RGBA")}, ["image", "RGBA"]),
    ({"image": PIL.Image.fromarray(np.full((16, 16), 40000, np.uint16))}, ["image", "I;16", "eight_bit"]),
    ({"image": _rgb(20, 16)}, ["image width"]),
    ({"image": _rgb(), "height": 32}, ["height=32"]),
    ({"image": np.zeros((16, 16, 4), np.uint8)}, ["image array"]),
    ({"mask": PIL.Image.new("L", (16, 16))}, ["mask needs image"]),
    ({"image": _rgb(), "mask": PIL.Image.new("RGBA", (16, 16))}, ["mask", "RGBA"]),
    ({"image": _rgb(), "mask": np.zeros((16, 16, 2))}, ["mask array"]),
    ({"latents": torch.zeros(1, 4, 4, 4)}, ["latents", "[1, 4, 8, 8]"]),
    ({"output": "jpg"}, ["output", "pil"]),
    ({"scheduler": "heun"}, ["scheduler", "ddim"]),
    ({"eta": -1.0}, ["eta"]),
    ({"seed": [1, 2]}, ["seed", "one seed per image"]),
    ({"seed": -3}, ["seed"]),
    ({"negative_prompt": ["a", "b"]}, ["negative_prompt"]),
    ({"prompt_embeds": torch.zeros(1, 77, 128)}, ["prompt or prompt_embeds"]),
    ({"prompt": None, "prompt_embeds": torch.zeros(1, 77, 7)}, ["prompt_embeds", "7"]),
    ({"prompt": None, "prompt_embeds": torch.zeros(1, 77, 7), "guidance_scale": 1.0}, ["prompt_embeds", "7"]),
    ({"prompt": None, "prompt_embeds": torch.zeros(0, 77, 128)}, ["prompt_embeds", "batch"]),
    ({"prompt": None, "prompt_embeds": torch.zeros(1, 10, 128)}, ["negative_prompt_embeds", "10"]),
])
def test_bad_call_arguments_raise_invalid_input(pipe, kwargs, words):
    kwargs = {"prompt": "a cat", "steps": 2, **kwargs}
    with pytest.raises(sdrt.InvalidInputError) as info:
        pipe(**kwargs)
    message = str(info.value)
    assert isinstance(info.value, ValueError) and "\n" not in message
    for word in words:
        assert word in message


def test_load_refuses_bad_arguments(tmp_path):
    with pytest.raises(sdrt.InvalidInputError, match="backend"):
        sdrt.load(tmp_path, backend="tensorflow")
    with pytest.raises(sdrt.InvalidInputError, match="dtype"):
        sdrt.load(tmp_path, dtype="float64")
    with pytest.raises(sdrt.InvalidInputError, match="device"):
        sdrt.load(tmp_path, device="tpu")
    with pytest.raises(sdrt.ModelLoadError, match="not found"):
        sdrt.load(tmp_path / "missing", device="cpu")


def test_load_without_bundled_model_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(sdrt.pipeline, "BUNDLED_MODEL", tmp_path / "not-installed")
    with pytest.raises(sdrt.ModelLoadError, match="bundled tiny model"):
        sdrt.load(None, device="cpu")


def test_mask_resized_to_the_image_and_image_defines_the_size(pipe):
    small_mask = PIL.Image.new("L", (8, 8), 255)
    result = pipe("a cat", steps=2, image=_rgb(), mask=small_mask, strength=0.5, seed=1)
    assert result.images[0].size == (16, 16)


def test_image_forms_agree():
    pil = _rgb()
    arr = np.asarray(pil)
    reference = image_to_tensor(pil)
    assert reference.shape == (1, 3, 16, 16) and reference.dtype == torch.float32
    assert torch.equal(image_to_tensor(arr), reference)
    assert torch.equal(image_to_tensor(arr.astype(np.float32) / 255), reference)
    assert torch.equal(image_to_tensor(reference[0]), reference)


def test_masks_are_binarized_from_every_form():
    arr = np.zeros((16, 16), np.uint8)
    arr[:, 8:] = 200
    expected = torch.zeros(1, 1, 16, 16)
    expected[..., 8:] = 1
    assert torch.equal(mask_to_tensor(PIL.Image.fromarray(arr), 16, 16), expected)
    assert torch.equal(mask_to_tensor(np.stack([arr] * 3, -1), 16, 16), expected)  # RGB by its luma
    assert torch.equal(mask_to_tensor(torch.from_numpy(arr / 255.0).float()[None], 16, 16), expected)
    assert torch.equal(mask_to_tensor(arr > 100, 16, 16), expected)
    resized = mask_to_tensor(PIL.Image.fromarray(arr).resize((32, 32), PIL.Image.NEAREST), 16, 16)
    assert torch.equal(resized, expected)


def test_png_parameters_round_trip_and_failed_write_leaves_nothing(tmp_path, monkeypatch):
    path = tmp_path / "a.png"
    params = {"prompt": 'a "quoted", multi\nline prompt ✓', "seed": 2**40}
    save_png(_rgb(), path, params)
    assert read_parameters(path) == params

    def broken_save(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(PIL.Image.Image, "save", broken_save)
    with pytest.raises(sdrt.InvalidInputError, match="No space left"):
        save_png(_rgb(), tmp_path / "b.png", params)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]


def test_png_gets_the_usual_file_mode_and_a_vanished_folder_is_one_error(tmp_path):
    umask = os.umask(0o022)
    try:
        save_png(_rgb(), tmp_path / "a.png", {})
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "a.png").stat().st_mode) == 0o644  # not mkstemp's private 0o600
    with pytest.raises(sdrt.InvalidInputError, match="cannot write"):
        save_png(_rgb(), tmp_path / "gone" / "b.png", {})


def test_sixteen_bit_and_palette_pictures_become_eight_bit_without_clipping(tmp_path):
    gray16 = np.array([[0, 257, 32896], [65535, 1000, 65278]], np.uint16)
    PIL.Image.fromarray(gray16).save(tmp_path / "g16.png")
    with PIL.Image.open(tmp_path / "g16.png") as img:
        assert img.mode.startswith("I")
        eight = eight_bit(img)
    assert eight.mode == "L"
    assert np.asarray(eight).tolist() == [[0, 1, 128], [255, 4, 254]]  # PIL's convert would give 255 for all but 0
    palette = _rgb().convert("P")
    assert eight_bit(palette).mode == "RGB"
    assert np.array_equal(np.asarray(eight_bit(palette)), np.asarray(palette.convert("RGB")))
    assert eight_bit(_rgb()).mode == "RGB"


def test_numpy_scalars_are_accepted_like_python_numbers():
    """Users compute settings with numpy: np.int64 seeds/steps/sizes and np.float32 scales are plain numbers."""
    import sdrt

    pipe = sdrt.load()
    plain = pipe("a red circle on a blue background", steps=3, guidance_scale=5.0, eta=0.5, seed=[3, 4],
                 num_images=2, height=64, width=64, output="np").images
    numpy_args = pipe("a red circle on a blue background", steps=np.int64(3), guidance_scale=np.float32(5.0),
                      eta=np.float64(0.5), seed=list(np.array([3, 4])), num_images=np.int32(2),
                      height=np.int64(64), width=np.int16(64), output="np").images
    assert np.array_equal(plain, numpy_args)

"""Argument checking of `sdrt.load` and `Pipeline.__call__`, image/mask conversion, PNG writing."""
from __future__ import annotations

import json
import os
import stat

import numpy as np
import PIL.Image
import pytest
import torch

import sdrt
from factories import save_pipeline
from sdrt.images import eight_bit, image_to_tensor, mask_to_tensor
from sdrt.checks import check_output_file
from sdrt.components import BUNDLED_MODEL
from sdrt.png import check_writable, read_parameters, save_png


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


@pytest.fixture(scope="module")
def bundled():
    """The bundled tiny model (64x64 images, [1, 4, 8, 8] latents, 64-wide text), which needs no ../shared."""
    return sdrt.load(device="cpu", limits=sdrt.Limits())


@pytest.mark.parametrize("kwargs, words", [
    ({"prompt": "a \udcff circle"}, ["prompt", "UTF-8", "0xff"]),
    ({"prompt": ["a circle", "a \ud800 square"]}, ["prompt[1]", "UTF-8", "U+D800"]),
    ({"negative_prompt": "blurry \udcc3"}, ["negative_prompt", "UTF-8"]),
    ({"image": _rgb(64, 64), "mask": np.zeros((0, 0))}, ["mask", "empty"]),
    ({"image": _rgb(64, 64), "mask": torch.zeros(0, 0)}, ["mask", "empty"]),
    ({"image": _rgb(64, 64), "mask": PIL.Image.new("L", (0, 0))}, ["mask", "empty"]),
    ({"image": np.zeros((0, 64, 3), np.float32)}, ["image", "empty"]),
    ({"latents": torch.zeros(1, 4, 8, 8, dtype=torch.int64)}, ["latents", "floating", "int64"]),
    ({"latents": torch.zeros(1, 4, 8, 8, dtype=torch.bool)}, ["latents", "floating", "bool"]),
    ({"latents": torch.zeros(1, 4, 8, 8, dtype=torch.complex64)}, ["latents", "floating", "complex64"]),
    ({"latents": torch.full((1, 4, 8, 8), float("nan"))}, ["latents", "NaN"]),
    ({"prompt": None, "prompt_embeds": torch.zeros(1, 77, 64, dtype=torch.int64)}, ["prompt_embeds", "int64"]),
    ({"prompt": None, "prompt_embeds": torch.zeros(1, 77, 64),
      "negative_prompt_embeds": torch.zeros(1, 77, 64, dtype=torch.int64)}, ["negative_prompt_embeds", "int64"]),
    ({"prompt": None, "prompt_embeds": torch.full((1, 77, 64), float("inf"))}, ["prompt_embeds", "inf"]),
    ({"progress": 5}, ["progress", "callable"]),
    ({"steps": 501}, ["steps", "[1, 500]", "SDRT_MAX_STEPS"]),
    ({"num_images": 65}, ["num_images=65", "max_images=64", "SDRT_MAX_IMAGES"]),
    ({"prompt": ["a"] * 33, "num_images": 2}, ["66 images", "max_images=64"]),
])
def test_bad_call_arguments_raise_invalid_input_before_any_work(bundled, kwargs, words, monkeypatch):
    def no_work(*args, **kw):
        raise AssertionError("the text encoder ran before the arguments were checked")
    monkeypatch.setattr(bundled, "text_encoder", no_work)
    kwargs = {"prompt": "a red circle", "steps": 2, "seed": 0, **kwargs}
    with pytest.raises(sdrt.InvalidInputError) as info:
        bundled(**kwargs)
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message


@pytest.mark.parametrize("model", [123, b"/tmp/model", 1.5, ["a"]])
def test_load_refuses_a_model_that_is_not_a_path(model):
    with pytest.raises(sdrt.InvalidInputError, match="model must be None or a path"):
        sdrt.load(model, device="cpu")
    with pytest.raises(sdrt.InvalidInputError, match="tokenizer must be None or a path"):
        sdrt.load(None, device="cpu", tokenizer=model)


def test_limits_are_configurable_per_pipeline_and_by_environment(monkeypatch):
    pipe = sdrt.load(device="cpu", limits=sdrt.Limits(max_images=2, max_steps=3, max_pixels=64 * 32))
    assert pipe.limits == sdrt.Limits(max_images=2, max_steps=3, max_pixels=2048)
    for kwargs, words in [({"num_images": 3}, "max_images=2"), ({"steps": 4}, r"\[1, 3\]"),
                          ({"height": 64}, "max_pixels=2048"),
                          ({"image": _rgb(64, 64), "height": None, "width": None}, "the image's size = 64x64")]:
        with pytest.raises(sdrt.InvalidInputError, match=words):
            pipe("a red circle", **{"steps": 3, "height": 32, "width": 64, **kwargs})
    assert pipe("a red circle", steps=3, height=32, width=64, num_images=2, output="latent").latents.shape[0] == 2

    monkeypatch.setenv("SDRT_MAX_STEPS", "7")
    monkeypatch.setenv("SDRT_MAX_IMAGES", "3")
    assert sdrt.load(device="cpu").limits == sdrt.Limits(max_images=3, max_steps=7)
    assert sdrt.Limits.from_env({"SDRT_MAX_PIXELS": " 4096 "}) == sdrt.Limits(max_pixels=4096)
    for environ in ({"SDRT_MAX_STEPS": "many"}, {"SDRT_MAX_IMAGES": "0"}, {"SDRT_MAX_PIXELS": "-1"}):
        with pytest.raises(sdrt.InvalidInputError, match=next(iter(environ))):
            sdrt.Limits.from_env(environ)
    for bad in (0, -1, 2.5, True, "8"):
        with pytest.raises(sdrt.InvalidInputError, match="max_steps"):
            sdrt.Limits(max_steps=bad)
    with pytest.raises(sdrt.InvalidInputError, match="limits"):
        sdrt.load(device="cpu", limits={"max_steps": 3})


@pytest.mark.parametrize("config", ["bundled", "sd"])
def test_every_step_count_in_the_stated_range_is_one_the_schedulers_run(config):
    """[1, Limits.max_steps] is real: every scheduler but lcm (bounded by its own config) builds finite tables
    at the ends of the range, with the bundled model's config and SD's (DDIM leading spacing, steps_offset 1,
    which refuses 1000)."""
    from sdrt.components import SD_SCHEDULER_CONFIG
    from sdrt.schedulers import SCHEDULER_NAMES, make_scheduler

    scheduler_config = BUNDLED_MODEL / "scheduler" / "scheduler_config.json"
    config = json.loads(scheduler_config.read_text()) if config == "bundled" else SD_SCHEDULER_CONFIG
    top = sdrt.Limits().max_steps
    for name in SCHEDULER_NAMES:
        if name == "lcm":
            continue
        scheduler = make_scheduler(name, config)
        for steps in (1, 2, top - 1, top):
            schedule = scheduler.set_timesteps(steps)
            assert all(torch.isfinite(t).all() for t in schedule.tables.values()), (name, steps)


@pytest.mark.parametrize("part", ["unet", "vae"])
def test_nan_advice_fits_the_run(part):
    """A float32 run that goes non-finite is not a precision problem: the error must not advise float32."""
    pipe = sdrt.load(device="cpu")
    layer = pipe.unet.conv_out if part == "unet" else pipe.vae.decoder.conv_out
    layer.bias.fill_(float("inf"))
    with pytest.raises(sdrt.NumericalError) as info:
        pipe("a red circle", steps=2, seed=0)
    message = str(info.value)
    assert "float32" in message and "already float32" in message and "try dtype='float32'" not in message
    assert ("VAE" in message) == (part == "vae")


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


def test_output_paths_too_long_or_ending_in_a_separator_are_refused(tmp_path):
    with pytest.raises(sdrt.InvalidInputError, match="300 bytes long"):
        check_writable(tmp_path / ("a" * 296 + ".png"))
    with pytest.raises(sdrt.InvalidInputError, match="separator"):
        check_writable(f"{tmp_path / 'out.png'}{os.sep}")
    with pytest.raises(sdrt.InvalidInputError, match="is a folder"):
        check_output_file(tmp_path, "--json")
    (tmp_path / "file").write_text("")
    with pytest.raises(sdrt.InvalidInputError, match="not a folder"):
        check_output_file(tmp_path / "file" / "new" / "report.json", "--json", make_parents=True)
    assert check_output_file(tmp_path / "new" / "deeper" / "report.json", "--json", make_parents=True).name == "report.json"
    with pytest.raises(sdrt.InvalidInputError, match="does not exist"):
        check_output_file(tmp_path / "new" / "report.json", "--json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_longest_legal_file_name_is_written(tmp_path):
    path = check_writable(tmp_path / ("a" * 251 + ".png"))  # 255 bytes, the most a file name may have
    save_png(_rgb(), path, {"seed": 1})
    assert [p.name for p in tmp_path.iterdir()] == [path.name] and read_parameters(path) == {"seed": 1}

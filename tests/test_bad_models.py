"""Copies of the bundled model with one thing broken: refused at load time, before any generation, with a
ModelLoadError (API) or exit 2 and one line (CLI) naming the file, the key and the value."""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import sdrt
from cli_run import assert_refused, sdrt as run_sdrt
from sdrt import config as configs
from sdrt.components import BUNDLED_MODEL, load_components

UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


def edit_config(file: str, **changes):
    def edit(model: Path) -> None:
        data = json.loads((model / file).read_text())
        data.update(changes)
        (model / file).write_text(json.dumps(data))
    return edit


def retype_tensor(key: str, dtype: torch.dtype):
    def edit(model: Path) -> None:
        tensors = load_file(str(model / UNET_WEIGHTS))
        tensors[key] = tensors[key].to(dtype)
        save_file(tensors, str(model / UNET_WEIGHTS))
    return edit


def nest(file: str, depth: int = 200_000):
    def edit(model: Path) -> None:
        (model / file).write_text("[" * depth)
    return edit


# (what is broken, the edit, the file and words the one-line error must hold)
CASES = [
    ("int32 tensor", retype_tensor("conv_in.weight", torch.int32), UNET_WEIGHTS, ["'conv_in.weight'", "int32"]),
    ("bool tensor", retype_tensor("conv_out.bias", torch.bool), UNET_WEIGHTS, ["'conv_out.bias'", "bool"]),
    ("groups not dividing", edit_config("unet/config.json", norm_num_groups=7), "unet/config.json",
     ["norm_num_groups=7", "divide"]),
    ("groups a string", edit_config("unet/config.json", norm_num_groups="8"), "unet/config.json",
     ["norm_num_groups='8'", "integer"]),
    ("zero heads", edit_config("unet/config.json", attention_head_dim=0), "unet/config.json",
     ["attention_head_dim=0", ">= 1"]),
    ("heads not dividing", edit_config("unet/config.json", attention_head_dim=[3, 4]), "unet/config.json",
     ["attention_head_dim=[3, 4]", "divide"]),
    ("vae groups", edit_config("vae/config.json", norm_num_groups=5), "vae/config.json", ["norm_num_groups=5"]),
    ("vae scaling", edit_config("vae/config.json", scaling_factor="0.18"), "vae/config.json", ["scaling_factor='0.18'"]),
    ("clip heads", edit_config("text_encoder/config.json", num_attention_heads=3), "text_encoder/config.json",
     ["num_attention_heads=3", "hidden_size=64"]),
    ("clip layers a bool", edit_config("text_encoder/config.json", num_hidden_layers=True), "text_encoder/config.json",
     ["num_hidden_layers=True"]),
    ("block types not a list", edit_config("unet/config.json", down_block_types=5), "unet/config.json",
     ["down_block_types=5", "list"]),
    ("nested index", nest("model_index.json"), "model_index.json", ["nested too deeply"]),
    ("nested config", nest("unet/config.json"), "unet/config.json", ["nested too deeply"]),
]


def broken_copy(tmp_path: Path, edit) -> Path:
    model = tmp_path / "model"
    shutil.copytree(BUNDLED_MODEL, model)
    edit(model)
    return model


@pytest.mark.parametrize("what, edit, file, words", CASES, ids=[c[0] for c in CASES])
def test_broken_model_raises_model_load_error(tmp_path, what, edit, file, words):
    model = broken_copy(tmp_path, edit)
    with pytest.raises(sdrt.ModelLoadError) as info:
        sdrt.load(model, device="cpu")
    message = str(info.value)
    assert str(model / file) in message and "\n" not in message
    for word in words:
        assert word in message, message


CLI_CASES = [c for c in CASES if c[0] in ("int32 tensor", "groups a string", "zero heads", "nested index")]


@pytest.mark.parametrize("what, edit, file, words", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_broken_model_exits_2_with_one_line(tmp_path, what, edit, file, words):
    model = broken_copy(tmp_path, edit)
    run = run_sdrt("generate", "x", "-o", tmp_path / "out.png", "--model", model, "--steps", 1)
    assert_refused(run, tmp_path, str(model / file), *words)


def test_weights_of_another_floating_dtype_still_load(tmp_path):
    model = broken_copy(tmp_path, retype_tensor("conv_in.weight", torch.float16))
    unet = load_components(model).unet
    assert unet.conv_in.weight.dtype == torch.float32


def test_every_config_field_has_a_rule():
    """check_config checks each field it knows: a field added without a rule would go unchecked."""
    for cls, rules in configs._RULES.items():
        assert set(rules) == {f.name for f in dataclasses.fields(cls)}, cls.__name__


@pytest.mark.parametrize("reader, raw, words", [
    (configs.unet_config, {"layers_per_block": 0}, ["layers_per_block=0"]),
    (configs.unet_config, {"norm_eps": -1e-5}, ["norm_eps=-1e-05", "> 0"]),
    (configs.unet_config, {"norm_eps": float("nan")}, ["norm_eps=nan", "finite"]),
    (configs.unet_config, {"block_out_channels": []}, ["block_out_channels=[]"]),
    (configs.unet_config, {"block_out_channels": [320, "640", 1280, 1280]}, ["block_out_channels="]),
    (configs.unet_config, {"num_attention_heads": [0, 1, 1, 1]}, ["num_attention_heads=[0, 1, 1, 1]"]),
    (configs.unet_config, {"use_linear_projection": "yes"}, ["use_linear_projection='yes'", "true or false"]),
    (configs.unet_config, {"cross_attention_dim": 7.5}, ["cross_attention_dim=7.5"]),
    (configs.unet_config, {"downsample_padding": -1}, ["downsample_padding=-1", ">= 0"]),
    (configs.unet_config, {"mid_block_scale_factor": "1"}, ["mid_block_scale_factor='1'", "finite number"]),
    (configs.vae_config, {"latent_channels": 0}, ["latent_channels=0"]),
    (configs.vae_config, {"block_out_channels": [64, 80]}, ["norm_num_groups=32", "[64, 80]"]),
    (configs.vae_config, {"up_block_types": ["UpDecoderBlock2D"] * 2}, ["up_block_types", "differ in length"]),
    (configs.clip_text_config, {"vocab_size": -5}, ["vocab_size=-5"]),
    (configs.clip_text_config, {"layer_norm_eps": 0}, ["layer_norm_eps=0"]),
    (configs.clip_text_config, {"max_position_embeddings": None}, ["max_position_embeddings=None"]),
])
def test_config_values_of_the_wrong_type_or_range_are_refused(reader, raw, words):
    with pytest.raises(sdrt.ModelLoadError) as info:
        reader(raw, "some/config.json")
    message = str(info.value)
    assert message.startswith("some/config.json: ")
    for word in words:
        assert word in message, message


def test_long_values_are_shortened_in_the_message():
    with pytest.raises(sdrt.ModelLoadError) as info:
        configs.unet_config({"norm_num_groups": "x" * 1000})
    assert "norm_num_groups='xxx" in str(info.value) and len(str(info.value)) < 200

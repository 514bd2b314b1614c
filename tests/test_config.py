"""Configs: unsupported settings are refused at load time with a ModelLoadError naming the key and value."""
from __future__ import annotations

import json
import shutil

import pytest

import sdrt
from sdrt.components import load_components
from sdrt.config import unet_config, vae_config
from factories import save_pipeline



@pytest.fixture(scope="module")
def sd1_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("sd1")
    save_pipeline(path, "sd1")
    return path


def edited_copy(src, dst, file: str, **changes):
    shutil.copytree(src, dst)
    config = dst / file
    data = json.loads(config.read_text())
    data.update(changes)
    config.write_text(json.dumps(data))
    return dst


@pytest.mark.parametrize("file,key,value", [
    ("unet/config.json", "addition_embed_type", "image"),
    ("unet/config.json", "addition_embed_type", "text_time"),  # SDXL's, without its dimensions
    ("unet/config.json", "reverse_transformer_layers_per_block", [[1], [1]]),
    ("unet/config.json", "time_cond_proj_dim", 256),
    ("unet/config.json", "class_embed_type", "timestep"),
    ("unet/config.json", "mid_block_type", None),
    ("unet/config.json", "cross_attention_dim", [128, 128]),
    ("vae/config.json", "act_fn", "gelu"),
    ("vae/config.json", "shift_factor", 0.1159),
    ("model_index.json", "_class_name", "StableDiffusionXLControlNetPipeline"),
])
def test_unsupported_value_is_refused_naming_key_and_value(sd1_folder, tmp_path, file, key, value):
    folder = edited_copy(sd1_folder, tmp_path / "model", file, **{key: value})
    with pytest.raises(sdrt.ModelLoadError) as info:
        load_components(folder)
    message = str(info.value)
    assert key in message and repr(value) in message
    assert file.split("/")[0] in message


@pytest.mark.parametrize("file,key,entry", [
    ("unet/config.json", "down_block_types", "SimpleCrossAttnDownBlock2D"),
    ("unet/config.json", "up_block_types", "AttnUpBlock2D"),
    ("vae/config.json", "down_block_types", "AttnDownEncoderBlock2D"),
])
def test_unsupported_block_type_is_refused(sd1_folder, tmp_path, file, key, entry):
    original = json.loads((sd1_folder / file).read_text())[key]
    folder = edited_copy(sd1_folder, tmp_path / "model", file, **{key: [entry] + original[1:]})
    with pytest.raises(sdrt.ModelLoadError, match=key) as info:
        load_components(folder)
    assert repr(entry) in str(info.value)


def test_saved_configs_of_every_supported_kind_load(sd1_folder):
    """The configs diffusers writes today (with all their extra keys) pass the checks."""
    components = load_components(sd1_folder)
    assert components.unet.config.block_out_channels == (32, 64)
    assert components.vae.config.scaling_factor == pytest.approx(0.18215)
    assert components.scheduler_config["prediction_type"] == "epsilon"


def test_mismatched_block_lengths_are_refused():
    with pytest.raises(sdrt.ModelLoadError, match="differ in length"):
        unet_config({"block_out_channels": [32, 64], "down_block_types": ["DownBlock2D"] * 3})
    with pytest.raises(sdrt.ModelLoadError, match="differ in length"):
        unet_config({"block_out_channels": [32, 64], "attention_head_dim": [1, 2, 4]})
    with pytest.raises(sdrt.ModelLoadError, match="differ in length"):
        vae_config({"block_out_channels": [32, 64], "down_block_types": ["DownEncoderBlock2D"]})


def test_per_block_heads():
    two = {"block_out_channels": [64, 128], "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
           "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"]}
    assert unet_config({**two, "attention_head_dim": [1, 2]}).heads() == (1, 2)
    assert unet_config({**two, "attention_head_dim": 8}).heads() == (8, 8)
    # num_attention_heads, when given, wins over the misnamed attention_head_dim
    assert unet_config({**two, "attention_head_dim": 8, "num_attention_heads": [2, 4]}).heads() == (2, 4)


def test_sd2_folder_is_v_prediction(tmp_path):
    save_pipeline(tmp_path, "sd2")
    components = load_components(tmp_path)
    assert components.scheduler_config["prediction_type"] == "v_prediction"
    assert components.unet.config.use_linear_projection and components.unet.config.heads() == (1, 2)

"""SDXL's TensorRT profiles, built without TensorRT: 768..1344 around 1024 with batch 1-4 by default, and
every U-Net input's (min, opt, max) shapes, SDXL's text_embeds and time_ids included."""
from __future__ import annotations

import dataclasses

from sdrt.backends.tensorrt_backend import default_profile
from sdrt.components import load_components
from sdrt.export.contracts import ShapeProfile, contracts_for
from sdrt.export.sdxl_contracts import sdxl_profile
from sdxl_factories import PROJECTION, save_sdxl


def test_sdxl_default_profile_and_unet_profile_shapes(tmp_path):
    save_sdxl(tmp_path / "base")
    components = load_components(tmp_path / "base")
    assert sdxl_profile(1024, 8) == ShapeProfile(batch=(1, 2, 4), height=(768, 1024, 1344), width=(768, 1024, 1344))
    scale = components.vae.config.downsample_factor  # the tiny VAE's: 2
    assert default_profile(components) == sdxl_profile(components.unet.config.sample_size * scale, scale)
    native = components  # as if native 1024x1024: shapes only, no weights change
    native.unet.config = dataclasses.replace(components.unet.config, sample_size=1024 // scale)
    profile = default_profile(native)
    assert profile.height == profile.width == (768, 1024, 1344) and profile.batch == (1, 2, 4)
    profile.validate(scale)
    shapes = contracts_for(native)["unet"].profile_shapes(profile)
    assert set(shapes) == {"sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"}
    assert shapes["sample"] == tuple((b, 4, side // scale, side // scale)
                                     for b, side in zip((1, 2, 4), (768, 1024, 1344)))
    assert shapes["text_embeds"] == ((1, PROJECTION), (2, PROJECTION), (4, PROJECTION))
    assert shapes["time_ids"] == ((1, 6), (2, 6), (4, 6))
    assert shapes["encoder_hidden_states"] == ((1, 77, 128), (2, 77, 128), (4, 231, 128))
    text = contracts_for(native)["text_encoder_2"].profile_shapes(profile)
    assert text == {"input_ids": ((1, 77), (2, 77), (4, 77))}

"""Context lengths 77*k in the export contracts: the U-Net's sequence axis is dynamic in ONNX, and TensorRT
profiles span 77..231 (3 prompt chunks) by default. (The CUDA-graph key holds the context's shape:
tests/test_graphs.py "context length"; ONNX Runtime on a 2-chunk prompt: tests/test_onnxruntime_backend.py.)"""
from __future__ import annotations

import pytest

import sdrt
from sdrt.components import load_components
from sdrt.export.contracts import ShapeProfile, contracts_for


def test_unet_context_axis_is_dynamic_and_profiled_77_to_231():
    components = load_components(None)
    contracts = contracts_for(components)
    unet = contracts["unet"]
    assert unet.dynamic_axes["encoder_hidden_states"] == {0: "batch", 1: "text_length"}
    profile = ShapeProfile(batch=(1, 2, 4), height=(32, 64, 128), width=(32, 64, 128))
    assert profile.text_length == (77, 77, 231) and not profile.is_static
    assert ShapeProfile.static(1, 64, 64).is_static
    width = components.unet.config.cross_attention_dim
    assert unet.profile_shapes(profile)["encoder_hidden_states"] == ((1, 77, width), (2, 77, width), (4, 231, width))
    assert contracts["text_encoder"].profile_shapes(profile)["input_ids"][2] == (4, 77)  # one chunk per row
    assert ShapeProfile.static(2, 64, 64, text_length=154).as_dict()["text_length"] == [154, 154, 154]


@pytest.mark.parametrize("lengths", [(77, 100, 231), (0, 77, 77), (154, 77, 231)])
def test_bad_text_length_profile(lengths):
    with pytest.raises(sdrt.InvalidInputError, match="text_length"):
        ShapeProfile(text_length=lengths).validate(8)

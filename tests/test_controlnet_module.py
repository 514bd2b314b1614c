"""ControlNet module parity: random-weight diffusers ControlNetModel folders (and original `control_model.*`
single files), loaded by sdrt, give the same residuals; the U-Net takes them as diffusers' does.

Tolerance: max abs error <= 1e-4 in fp32 on CPU (both sides fp32 torch; summation order only), as issue 17 asks.
"""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from sdrt.components import load_component
from sdrt.controlnet_loading import check_fits, controlnet_rules, load_controlnet
from sdrt.errors import InvalidInputError, ModelLoadError

ATOL = 1e-4

SD1 = dict(block_out_channels=(32, 64), layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
           cross_attention_dim=32, attention_head_dim=8, conditioning_embedding_out_channels=(16, 32))
SD2 = dict(block_out_channels=(32, 64), layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
           cross_attention_dim=48, attention_head_dim=[2, 4], use_linear_projection=True, upcast_attention=True,
           conditioning_embedding_out_channels=(16, 32))
# three levels, two layers a level, SD 1.x heads, the SD release's 8x hint tower (as a single file would have), BGR
THREE_LEVELS = dict(block_out_channels=(32, 32, 64), layers_per_block=2,
                    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                    cross_attention_dim=32, attention_head_dim=8, controlnet_conditioning_channel_order="bgr")
POOLED = dict(SD1, global_pool_conditions=True)
CONFIGS = {"sd1": SD1, "sd2": SD2, "three_levels": THREE_LEVELS, "pooled": POOLED}


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """diffusers zero-initialises the zero convs (and conv_out): random values everywhere make parity meaningful."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def diffusers_controlnet(seed: int = 0, **config):
    from diffusers import ControlNetModel

    return randomize_(ControlNetModel(norm_num_groups=32, **config), seed)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    out = {}
    for name, config in CONFIGS.items():
        path = tmp_path_factory.mktemp(f"controlnet_{name}")
        ref = diffusers_controlnet(**config)
        ref.save_pretrained(str(path))
        out[name] = (ref, load_controlnet(path))
    return out


def inputs(ref, batch: int, h: int, w: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    factor = 2 ** (len(ref.config.conditioning_embedding_out_channels) - 1)
    sample = torch.randn(batch, 4, h, w, generator=g)
    context = torch.randn(batch, 7, ref.config.cross_attention_dim, generator=g)
    control = torch.rand(batch, 3, h * factor, w * factor, generator=g)
    return sample, context, control


def assert_residuals_close(expected, got):
    (e_down, e_mid), (g_down, g_mid) = expected, got
    assert len(g_down) == len(e_down)
    for e, g in zip(e_down, g_down):
        assert g.shape == e.shape and (g - e).abs().max().item() <= ATOL
    assert g_mid.shape == e_mid.shape and (g_mid - e_mid).abs().max().item() <= ATOL


@pytest.mark.parametrize("name,batch,h,w,scale,guess", [
    ("sd1", 2, 8, 8, 1.0, False),
    ("sd1", 1, 8, 12, 0.6, True),
    ("sd2", 2, 8, 12, 0.8, False),
    ("three_levels", 1, 8, 8, 1.0, False),
    ("three_levels", 1, 8, 8, 0.5, True),
    ("pooled", 1, 8, 8, 0.7, True),
])
def test_residuals_match_diffusers(saved, name, batch, h, w, scale, guess):
    ref, ours = saved[name]
    sample, context, control = inputs(ref, batch, h, w)
    t = torch.tensor(421)
    with torch.no_grad():
        out = ref(sample, t, encoder_hidden_states=context, controlnet_cond=control, conditioning_scale=scale,
                  guess_mode=guess, return_dict=False)
        got = ours(sample, t, context, control, scale, guess)
    assert_residuals_close(out, got)


def test_unet_adds_residuals_as_diffusers(tmp_path, saved):
    from diffusers import UNet2DConditionModel

    unet_ref = randomize_(UNet2DConditionModel(sample_size=8, norm_num_groups=32, out_channels=4,
                                               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                               **{k: v for k, v in SD1.items() if "conditioning" not in k}), seed=3)
    unet_ref.save_pretrained(str(tmp_path))
    unet = load_component(tmp_path, "unet")
    ref, ours = saved["sd1"]
    sample, context, control = inputs(ref, 2, 8, 8)
    t = torch.tensor(10)
    with torch.no_grad():
        down, mid = ours(sample, t, context, control)
        expected = unet_ref(sample, t, encoder_hidden_states=context, down_block_additional_residuals=down,
                            mid_block_additional_residual=mid).sample
        got = unet(sample, t, context, down, mid)
    assert (got - expected).abs().max().item() <= ATOL
    check_fits(ours.config, unet.config, "cn", "unet")  # a ControlNet made for this U-Net fits


def test_controlnet_for_another_base_model_is_refused(saved):
    _, ours = saved["sd2"]
    _, sd1 = saved["sd1"]
    with pytest.raises(InvalidInputError, match=r"controlnet cn2 was made for another base model: its "
                                                r"cross_attention_dim is 48, the model m's is 32"):
        check_fits(ours.config, sd1.config.unet, "cn2", "m")


def original_state_dict(ours, prefix: str = "control_model.") -> dict:
    """Our state dict in the original ControlNet layout, through sdrt's key table."""
    from sdrt.single_file import _find_rule

    rules = controlnet_rules(ours.config)
    return {prefix + _find_rule(rules, k).source_key(k): v.clone() for k, v in ours.state_dict().items()}


@pytest.mark.parametrize("prefix", ["control_model.", ""])
def test_single_file_matches_diffusers(saved, tmp_path, prefix):
    """The key table agrees with diffusers' own original -> diffusers conversion, and a `control_model.*` file
    (or one with bare keys) loads to the same residuals."""
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    ref, ours = saved["three_levels"]  # the SD release's hint tower: diffusers' converter assumes its 8 convs
    original = original_state_dict(ours, prefix)
    converted = convert_controlnet_checkpoint(dict(original), dict(ref.config))
    expected = ref.state_dict()
    assert set(converted) == set(expected)
    assert all(torch.equal(converted[k], expected[k]) for k in expected)

    path = tmp_path / "control.safetensors"
    save_file(original, str(path))
    loaded = load_controlnet(path)
    assert loaded.config.unet.block_out_channels == (32, 32, 64)
    assert loaded.config.conditioning_embedding_out_channels == (16, 32, 96, 256)
    sample, context, control = inputs(ref, 1, 8, 8)
    with torch.no_grad():
        # the file cannot say BGR; the reference is run on the flipped image
        out = ref(sample, 5, encoder_hidden_states=context, controlnet_cond=control, return_dict=False)
        got = loaded(sample, 5, context, control.flip(1))
    assert_residuals_close(out, got)


def test_not_a_controlnet_file(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file({"a": torch.zeros(1)}, str(path))
    with pytest.raises(ModelLoadError, match="not a ControlNet checkpoint"):
        load_controlnet(path)
    with pytest.raises(ModelLoadError, match="controlnet not found"):
        load_controlnet(tmp_path / "missing")

"""The VAE in float32 when float16 is not enough (sdrt.vae_precision), and a VAE given apart from the model
(sdrt.load(model, vae=PATH), sdrt.vae_loading). CPU: float16 convolutions run there too, slowly, on tiny models."""
from __future__ import annotations

import json
import logging

import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file, save_file

import sdrt
from sdrt.vae_precision import VAEPrecision
from sdxl_factories import save_sdxl
from test_single_file import ldm_vae


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    """(the tiny SDXL folder (VAE force_upcast true), a VAE folder of other weights with force_upcast false)."""
    root = tmp_path_factory.mktemp("sdxl")
    save_sdxl(root / "base")
    save_sdxl(root / "other", seed=5)
    config = json.loads((root / "other" / "vae" / "config.json").read_text())
    (root / "other" / "vae" / "config.json").write_text(json.dumps(dict(config, force_upcast=False)))
    return root / "base", root / "other" / "vae"


def test_overflowing_fp16_decode_is_redone_in_float32(caplog):
    pipe = sdrt.load(device="cpu", dtype="float16")  # the bundled SD model: no force_upcast, fallback only
    assert pipe.vae_precision.upcasts and not pipe.vae_precision.upcast_decode
    assert pipe.vae.config.force_upcast  # diffusers' default, which SD 1.x pipelines ignore as diffusers' do
    with torch.no_grad():
        pipe.vae.decoder.conv_in.weight.mul_(3000)  # float16 activations overflow; float32 ones do not
    with caplog.at_level(logging.WARNING, logger="sdrt.vae_precision"):
        result = pipe("a cat", steps=2, seed=0, output="np")
    assert pipe.vae_precision.fallbacks == 1 and any("overflowed" in r.getMessage() for r in caplog.records)
    assert torch.isfinite(torch.from_numpy(result.images)).all()
    with torch.no_grad():
        overflow = pipe.vae.decode((result.latents / pipe.vae.scaling_factor).half())
    assert not torch.isfinite(overflow).all()  # the float16 decode alone would have been black
    pipe.vae_precision.upcasts = False
    with pytest.raises(sdrt.NumericalError, match="VAE decoded NaN or inf"):
        pipe("a cat", steps=2, seed=0, output="np")


def test_sdxl_force_upcast_decodes_and_encodes_in_float32(sdxl):
    base, other_vae = sdxl
    pipe = sdrt.load(base, device="cpu", dtype="float16")
    precision = pipe.vae_precision
    assert pipe.vae.config.force_upcast and precision.upcast_decode and precision.upcast_encode
    result = pipe("a cat", steps=2, seed=0, guidance_scale=5.0, output="np")
    fp32 = pipe.vae_precision._fp32
    assert fp32 is not None and next(fp32.parameters()).dtype == torch.float32
    assert next(pipe.vae.parameters()).dtype == torch.float16  # the model's VAE stays as loaded
    with torch.no_grad():
        expected = fp32.decode(result.latents / pipe.vae.scaling_factor)
    assert torch.equal(torch.from_numpy(result.images), (expected / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1))
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(pipe("a cat", image=image, steps=4, seed=0, output="latent").latents).all()
    mean, logvar = precision.encode(image * 2 - 1)
    with torch.no_grad():
        expected_mean, _ = fp32.encode(image * 2 - 1)
    assert mean.dtype == logvar.dtype == torch.float32 and torch.equal(mean, expected_mean)
    # diffusers' rule for bfloat16 (float32's range): encodes upcast, decodes do not
    bf16 = VAEPrecision(pipe.vae, torch.bfloat16, force_upcast=True)
    assert bf16.upcast_encode and not bf16.upcast_decode

    fixed = sdrt.load(base, device="cpu", dtype="float16", vae=other_vae)  # force_upcast false: fp16 decode
    assert not fixed.vae.config.force_upcast and not fixed.vae_precision.upcast_decode
    fixed("a cat", steps=2, seed=0, output="np")
    assert fixed.vae_precision._fp32 is None


def test_separate_vae_folder_or_file_replaces_the_models(sdxl, tmp_path):
    base, other_vae = sdxl
    other = load_file(str(other_vae / "diffusion_pytorch_model.safetensors"))
    from_folder = sdrt.load(base, device="cpu", dtype="float32", vae=other_vae)
    file = tmp_path / "sdxl_vae.safetensors"  # the original layout without first_stage_model., as VAEs are shared
    save_file({k.removeprefix("first_stage_model."): v.contiguous() for k, v in ldm_vae(other, 2).items()}, str(file))
    from_file = sdrt.load(base, device="cpu", dtype="float32", vae=file)
    for pipe in (from_folder, from_file):
        state = pipe.vae.state_dict()
        assert all(torch.equal(state[k], v) for k, v in other.items())
        assert pipe.vae.config.scaling_factor == 0.13025
    assert not from_file.vae.config.force_upcast
    own = sdrt.load(base, device="cpu", dtype="float32")
    kwargs = dict(steps=2, seed=0, output="np")
    assert not torch.equal(torch.from_numpy(own("a cat", **kwargs).images),
                           torch.from_numpy(from_folder("a cat", **kwargs).images))
    assert torch.equal(torch.from_numpy(from_file("a cat", **kwargs).images),
                       torch.from_numpy(from_folder("a cat", **kwargs).images))


def test_bad_separate_vae_is_refused(sdxl, tmp_path):
    base, other_vae = sdxl
    with pytest.raises(sdrt.ModelLoadError, match="vae not found"):
        sdrt.load(base, device="cpu", vae=tmp_path / "missing")
    save_file({"encoder.down_blocks.0.resnets.0.conv1.weight": torch.zeros(1)}, str(tmp_path / "diffusers.safetensors"))
    with pytest.raises(sdrt.ModelLoadError, match="folder"):
        sdrt.load(base, device="cpu", vae=tmp_path / "diffusers.safetensors")
    wide = tmp_path / "wide"  # a real VAE of 16 latent channels (as SD3's / Flux's): the SDXL U-Net takes 4
    AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=16, norm_num_groups=32).save_pretrained(wide)
    with pytest.raises(sdrt.ModelLoadError, match=r"vae=.*wide does not fit the model: latent_channels 16, the model's"):
        sdrt.load(base, device="cpu", vae=wide)
    with pytest.raises(sdrt.ModelLoadError, match=r"^vae: .*unet.config.json: unsupported config value"):
        sdrt.load(base, device="cpu", vae=base / "unet")
    with pytest.raises(sdrt.InvalidInputError, match="vae"):
        sdrt.load(base, device="cpu", vae=3)

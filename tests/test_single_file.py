"""Single-file original-layout checkpoints (CompVis / Stability) load to the same modules as the diffusers folder.

The original-layout file is written here from the diffusers folder by `to_original_layout`, a converter
written from the LDM and OpenCLIP layouts (not from sdrt's key table). diffusers' own single-file
converters then vouch for it: they map the file back to exactly the folder's tensors. Only then is
sdrt's loader checked against the folder: identical state dicts (torch.equal) and the same outputs as
the diffusers pipeline (U-Net and text encoder within 1e-4, VAE within 1e-3, fp32 CPU).

Without a tokenizer folder (a lone file, or a diffusers folder lacking tokenizer/), the bundled CLIP vocabulary
must give transformers' ids with the family's pad token, and `sdrt generate` the folder model's exact picture.
"""
from __future__ import annotations

import dataclasses
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import load_file, save_file

import sdrt
from factories import save_pipeline
from sdrt.components import BUNDLED_MODEL, load_components
from sdrt.tokenizer import CLIPTokenizer


UNET_ATOL, VAE_ATOL, TEXT_ATOL = 1e-4, 1e-3, 1e-4

_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


# ------------------------------------------------------------------ diffusers layout -> original layout
def _leaf(rest: str, renames: dict) -> str:
    for new, old in renames.items():
        if rest.startswith(new + "."):
            return old + rest[len(new):]
    return rest


def ldm_unet(sd: dict, layers_per_block: int) -> dict:
    """diffusers UNet2DConditionModel keys -> openaimodel.UNetModel keys (`model.diffusion_model.` prefix)."""
    per = layers_per_block + 1
    fixed = {"time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
             "conv_in.": "input_blocks.0.0.", "conv_norm_out.": "out.0.", "conv_out.": "out.2.",
             "mid_block.resnets.0.": "middle_block.0.", "mid_block.attentions.0.": "middle_block.1.",
             "mid_block.resnets.1.": "middle_block.2."}
    up_has_attention = {int(m.group(1)) for k in sd if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))}
    out = {}
    for key, value in sd.items():
        if m := re.match(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
            side, i, kind, j, rest = m.groups()
            index = 1 + int(i) * per + int(j) if side == "down" else int(i) * per + int(j)
            blocks = "input_blocks" if side == "down" else "output_blocks"
            new = (f"{blocks}.{index}.0.{_leaf(rest, _UNET_RESNET)}" if kind == "resnets"
                   else f"{blocks}.{index}.1.{rest}")
        elif m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
            new = f"input_blocks.{(int(m.group(1)) + 1) * per}.0.op.{m.group(2)}"
        elif m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
            i = int(m.group(1))
            new = f"output_blocks.{i * per + per - 1}.{2 if i in up_has_attention else 1}.conv.{m.group(2)}"
        else:
            prefix = next(p for p in fixed if key.startswith(p))
            rest = key[len(prefix):]
            new = fixed[prefix] + (_leaf(rest, _UNET_RESNET) if "resnets" in prefix else rest)
        out["model.diffusion_model." + new] = value
    return out


def ldm_vae(sd: dict, levels: int) -> dict:
    """diffusers AutoencoderKL keys -> ldm AutoencoderKL keys (`first_stage_model.` prefix), attention as 1x1 convs."""
    out = {}
    for key, value in sd.items():
        new = key.replace("conv_norm_out.", "norm_out.").replace("mid_block.resnets.0.", "mid.block_1.")
        new = new.replace("mid_block.resnets.1.", "mid.block_2.").replace("conv_shortcut.", "nin_shortcut.")
        new = new.replace("downsamplers.0.", "downsample.").replace("upsamplers.0.", "upsample.")
        new = re.sub(r"encoder\.down_blocks\.(\d+)\.", r"encoder.down.\1.", new)
        # the original decoder counts its levels from the bottom
        new = re.sub(r"decoder\.up_blocks\.(\d+)\.", lambda m: f"decoder.up.{levels - 1 - int(m.group(1))}.", new)
        new = re.sub(r"\.resnets\.(\d+)\.", r".block.\1.", new)
        if m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)", new):
            new = f"{m.group(1)}.mid.attn_1.{_leaf(m.group(2), _VAE_ATTENTION)}"
            if value.dim() == 2:
                value = value[:, :, None, None]
        out["first_stage_model." + new] = value
    return out


def ldm_clip(sd: dict) -> dict:
    """transformers CLIPTextModel -> SD 1.x `cond_stage_model.transformer.text_model.*`, with the position-id
    buffer older transformers versions saved."""
    out = {"cond_stage_model.transformer." + ("" if k.startswith("text_model.") else "text_model.") + k: v
           for k, v in sd.items()}
    n = sd[next(k for k in sd if k.endswith("position_embedding.weight"))].shape[0]
    out["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(n)[None]
    return out


def open_clip(sd: dict, seed: int = 7) -> dict:
    """transformers CLIPTextModel -> SD 2.x OpenCLIP `cond_stage_model.model.*`: fused q/k/v, a text projection,
    and one more resblock than diffusers keeps (SD 2.x conditions on the penultimate layer)."""
    sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
    p = "cond_stage_model.model."
    out = {p + "token_embedding.weight": sd["embeddings.token_embedding.weight"],
           p + "positional_embedding": sd["embeddings.position_embedding.weight"],
           p + "ln_final.weight": sd["final_layer_norm.weight"], p + "ln_final.bias": sd["final_layer_norm.bias"]}
    layer_names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                   "self_attn.out_proj": "attn.out_proj"}
    n = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"encoder\.layers\.(\d+)\.", k)))
    for i in range(n):
        a = f"encoder.layers.{i}."
        for ours, theirs in layer_names.items():
            for kind in ("weight", "bias"):
                out[f"{p}transformer.resblocks.{i}.{theirs}.{kind}"] = sd[f"{a}{ours}.{kind}"]
        for kind in ("weight", "bias"):
            out[f"{p}transformer.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat(
                [sd[f"{a}self_attn.{x}_proj.{kind}"] for x in "qkv"])
    g = torch.Generator().manual_seed(seed)
    for key in [k for k in out if f"resblocks.{n - 1}." in k]:  # the dropped last layer: random, same shapes
        out[key.replace(f"resblocks.{n - 1}.", f"resblocks.{n}.")] = torch.randn(out[key].shape, generator=g)
    width = sd["final_layer_norm.weight"].shape[0]
    out[p + "text_projection"] = torch.randn(width, width, generator=g)
    out[p + "logit_scale"] = torch.tensor(4.6052)
    return out


# ------------------------------------------------------------------------------------------- fixtures
def folder_tensors(folder) -> dict:
    """component -> the diffusers folder's tensors, as written by save_pretrained."""
    out = {name: load_file(str(folder / name / "diffusion_pytorch_model.safetensors")) for name in ("unet", "vae")}
    text = load_file(str(folder / "text_encoder" / "model.safetensors"))
    out["text_encoder"] = {("" if k.startswith("text_model.") else "text_model.") + k: v for k, v in text.items()}
    return out


def write_single_file(folder, path, kind: str, pipe, global_step: int = 1000) -> dict:
    tensors = folder_tensors(folder)
    text = open_clip(tensors["text_encoder"]) if kind == "sd2" else ldm_clip(tensors["text_encoder"])
    original = {**ldm_unet(tensors["unet"], pipe.unet.config.layers_per_block),
                **ldm_vae(tensors["vae"], len(pipe.vae.config.block_out_channels)), **text}
    original = {k: v.contiguous().clone() for k, v in original.items()}
    if path.suffix == ".ckpt":
        torch.save({"state_dict": original, "global_step": global_step}, path)
    else:
        save_file(original, str(path))
    tokenizer = path.parent / "tokenizer"
    tokenizer.mkdir(exist_ok=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(folder / "tokenizer" / name, tokenizer / name)
    return original


@pytest.fixture(scope="module", params=["sd1", "sd2", "inpaint"])
def model(request, tmp_path_factory):
    """(kind, diffusers pipeline, folder, original-layout dict, single-file path)."""
    kind = request.param
    root = tmp_path_factory.mktemp(kind)
    pipe = save_pipeline(root / "folder", kind)
    path = root / "single" / "model.safetensors"
    path.parent.mkdir()
    original = write_single_file(root / "folder", path, kind, pipe)
    return kind, pipe, root / "folder", original, path


# ------------------------------------------------------------------------------------------- tests
def assert_same_tensors(converted: dict, reference: dict, allowed_extra=lambda key: False):
    missing = set(reference) - set(converted)
    extra = {k for k in set(converted) - set(reference) if not allowed_extra(k)}
    assert not missing and not extra, (sorted(missing)[:5], sorted(extra)[:5])
    for key, value in reference.items():
        assert torch.equal(converted[key], value), key


def test_file_is_genuine_original_layout(model):
    """diffusers' own single-file converters map the file back to exactly the folder's tensors."""
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint, convert_open_clip_checkpoint)

    kind, pipe, folder, original, _ = model
    reference = folder_tensors(folder)
    assert_same_tensors(convert_ldm_unet_checkpoint(original, pipe.unet.config), reference["unet"])
    assert_same_tensors(convert_ldm_vae_checkpoint(original, pipe.vae.config), reference["vae"])
    if kind == "sd2":
        text = convert_open_clip_checkpoint(pipe.text_encoder, original)
        last = pipe.text_encoder.config.num_hidden_layers
        # diffusers drops the last resblock only when it is number 23 (ViT-H); the tiny tower's stays in
        assert_same_tensors(text, reference["text_encoder"],
                            lambda k: k.startswith(f"text_model.encoder.layers.{last}.") or k == "text_projection.weight")
    else:
        assert_same_tensors(convert_ldm_clip_checkpoint(original), reference["text_encoder"],
                            lambda k: k == "text_model.embeddings.position_ids")


def test_single_file_loads_to_identical_tensors(model):
    _, _, folder, _, path = model
    from_folder, from_file = load_components(folder), load_components(path)
    for name in ("unet", "vae", "text_encoder"):
        expected, got = getattr(from_folder, name).state_dict(), getattr(from_file, name).state_dict()
        assert list(got) == list(expected), name
        for key in expected:
            assert torch.equal(got[key], expected[key]), f"{name}: {key}"
    for name in ("unet", "vae"):
        # the weights cannot tell the native resolution; the rest of the architecture is inferred from shapes
        ours, theirs = (dataclasses.replace(getattr(c, name).config, sample_size=0) for c in (from_file, from_folder))
        assert ours == theirs, name


def test_single_file_outputs_match_diffusers(model):
    kind, pipe, _, _, path = model
    c = load_components(path)
    g = torch.Generator().manual_seed(0)
    prompts = ["a photo of a cat", "an astronaut riding a horse"]
    ids = c.tokenizer(prompts)
    # the tokenizer folder beside the file holds only vocab.json/merges.txt: SD 2.x must still pad with "!"
    assert torch.equal(ids, pipe.tokenizer(prompts, padding="max_length", max_length=77, truncation=True,
                                           return_tensors="pt").input_ids)
    sample = torch.randn(2, pipe.unet.config.in_channels, 8, 12, generator=g)
    timesteps = torch.tensor([10, 700])
    latents = torch.randn(1, 4, 4, 6, generator=g)
    with torch.no_grad():
        context = pipe.text_encoder(ids).last_hidden_state
        assert (c.text_encoder(ids) - context).abs().max().item() <= TEXT_ATOL
        expected = pipe.unet(sample, timesteps, encoder_hidden_states=context).sample
        assert (c.unet(sample, timesteps, context) - expected).abs().max().item() <= UNET_ATOL
        assert (c.vae.decode(latents) - pipe.vae.decode(latents).sample).abs().max().item() <= VAE_ATOL
    assert c.is_inpainting_unet == (kind == "inpaint")
    assert c.scheduler_config["prediction_type"] == ("v_prediction" if kind == "sd2" else "epsilon")


@pytest.mark.parametrize("model", ["sd1"], indirect=True)  # one .ckpt round trip is enough
def test_ckpt_loads_through_weights_only(model, tmp_path):
    kind, pipe, folder, original, path = model
    ckpt = tmp_path / "model.ckpt"
    write_single_file(folder, ckpt, kind, pipe)
    from_ckpt, from_file = load_components(ckpt), load_components(path)
    for name in ("unet", "vae", "text_encoder"):
        expected = getattr(from_file, name).state_dict()
        got = getattr(from_ckpt, name).state_dict()
        assert all(torch.equal(got[k], v) for k, v in expected.items()), name


# ------------------------------------------------------------------------- models without a tokenizer
PROMPTS = ["a photo of a cat", "an astronaut riding a horse, wow!!!", "", "café 日本語 😀 (masterpiece:1.2)"]


def reference_ids(pipe, prompts=PROMPTS) -> torch.Tensor:
    return pipe.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


def test_single_file_without_tokenizer_uses_bundled_vocabulary(model, tmp_path, caplog):
    kind, pipe, _, _, path = model
    lonely = tmp_path / "lonely.safetensors"
    shutil.copy(path, lonely)
    with caplog.at_level(logging.INFO, logger="sdrt.components"):
        tokenizer = load_components(lonely).tokenizer
    assert torch.equal(tokenizer(PROMPTS), reference_ids(pipe))
    assert tokenizer.pad_token_id == (0 if kind == "sd2" else 49407)
    assert any("vocabulary bundled with sdrt" in r.getMessage() and str(lonely) in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("model", ["sd1"], indirect=True)
def test_tokenizer_folder_takes_precedence_over_the_bundled_vocabulary(model, tmp_path):
    _, _, _, _, path = model
    lonely = tmp_path / "lonely.safetensors"
    shutil.copy(path, lonely)
    other = BUNDLED_MODEL / "tokenizer"  # the tiny model's own small vocabulary tells the two apart
    other_size = CLIPTokenizer.from_folder(other).vocab_size
    assert other_size != 49408
    assert load_components(lonely, tokenizer=other).tokenizer.vocab_size == other_size
    shutil.copytree(other, tmp_path / "tokenizer")
    assert load_components(lonely).tokenizer.vocab_size == other_size
    with pytest.raises(sdrt.ModelLoadError, match="tokenizer="):
        load_components(lonely, tokenizer=tmp_path / "empty")


def test_folder_without_tokenizer_uses_bundled_vocabulary(model, tmp_path):
    kind, pipe, folder, _, _ = model
    copy = Path(shutil.copytree(folder, tmp_path / "model", ignore=shutil.ignore_patterns("tokenizer")))
    assert not (copy / "tokenizer").exists()
    tokenizer = load_components(copy).tokenizer
    assert torch.equal(tokenizer(PROMPTS), reference_ids(pipe))
    assert tokenizer.pad_token_id == (0 if kind == "sd2" else 49407)


def test_model_without_tokenizer_whose_vocabulary_is_not_clips_is_refused(tmp_path):
    copy = shutil.copytree(BUNDLED_MODEL, tmp_path / "tiny", ignore=shutil.ignore_patterns("tokenizer"))
    with pytest.raises(sdrt.ModelLoadError) as info:
        load_components(copy)
    assert str(copy) in str(info.value) and "49408" in str(info.value) and "tokenizer=" in str(info.value)


def _generate(model_path, out) -> np.ndarray:
    entry_point = Path(sys.executable).with_name("sdrt")
    entry_point = str(entry_point) if entry_point.is_file() else shutil.which("sdrt")
    assert entry_point, "the sdrt entry point is not installed (pip install -e .)"
    run = subprocess.run([entry_point, "generate", "a photo of a cat, wow!", "--model", str(model_path), "-o", str(out),
                          "--size", "16x16", "--steps", "2", "--seed", "3", "--guidance", "5", "--device", "cpu"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    return np.asarray(PIL.Image.open(out))


@pytest.mark.parametrize("model", ["sd1", "sd2"], indirect=True)
def test_generate_single_file_without_tokenizer(model, tmp_path):
    """`sdrt generate` on a lone .safetensors makes the folder model's picture (whose tokenizer is the real one)."""
    _, _, folder, _, path = model
    lonely = tmp_path / "single" / "model.safetensors"
    lonely.parent.mkdir()
    shutil.copy(path, lonely)
    assert np.array_equal(_generate(lonely, tmp_path / "single.png"), _generate(folder, tmp_path / "folder.png"))


def test_single_file_missing_tensor_names_key(model, tmp_path):
    _, _, _, original, path = model
    key = "model.diffusion_model.middle_block.1.proj_out.weight"
    broken = tmp_path / "broken.safetensors"
    save_file({k: v for k, v in original.items() if k != key}, str(broken))
    shutil.copytree(path.parent / "tokenizer", tmp_path / "tokenizer")
    with pytest.raises(sdrt.ModelLoadError) as info:
        load_components(broken)
    assert repr(key) in str(info.value) and str(broken) in str(info.value)


# ------------------------------------------------------------------------------- prediction type
def _copy_with_tokenizer(path, target, tensors=None, metadata=None):
    """`path`'s file (or `tensors`) at `target`, with the tokenizer folder beside it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if tensors is None and metadata is None:
        shutil.copy(path, target)
    else:
        save_file(tensors if tensors is not None else load_file(str(path)), str(target), metadata=metadata)
    if not (target.parent / "tokenizer").exists():
        shutil.copytree(path.parent / "tokenizer", target.parent / "tokenizer")
    return target


def _warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize("model", ["sd2"], indirect=True)
def test_sd2_file_that_says_nothing_is_assumed_768_v_with_a_warning(model, caplog):
    path = model[4]
    with caplog.at_level(logging.INFO, logger="sdrt"):
        c = load_components(path)
    assert c.scheduler_config["prediction_type"] == "v_prediction" and c.unet.config.sample_size == 96
    [warning] = _warnings(caplog)
    assert str(path) in warning and "768-v" in warning
    assert "prediction_type='epsilon'" in warning and "--prediction-type epsilon" in warning


@pytest.mark.parametrize("model", ["sd2"], indirect=True)
def test_prediction_type_argument_decides_for_a_single_file(model, caplog):
    with caplog.at_level(logging.INFO, logger="sdrt"):
        c = load_components(model[4], prediction_type="epsilon")
        pipe = sdrt.load(model[4], device="cpu", prediction_type="epsilon")
    assert c.scheduler_config["prediction_type"] == "epsilon" and c.unet.config.sample_size == 64  # the 512 base
    side = 64 * pipe.vae_scale_factor  # the tiny VAE halves once: 128 here, 512 for SD's 8x VAE
    assert pipe.scheduler_config["prediction_type"] == "epsilon" and pipe.native_size == (side, side)
    assert not _warnings(caplog)


@pytest.mark.parametrize("model", ["sd2"], indirect=True)
@pytest.mark.parametrize("yaml, expected", [
    ('model:\n  params:\n    parameterization: "v"\n    timesteps: 1000\n', "v_prediction"),
    ("model:\n  params:\n    timesteps: 1000\n", "epsilon"),  # LDM's default parameterization is eps
])
def test_yaml_beside_the_file_decides(model, tmp_path, caplog, yaml, expected):
    path = _copy_with_tokenizer(model[4], tmp_path / "sd2.safetensors")
    (tmp_path / "sd2.yaml").write_text(yaml)
    with caplog.at_level(logging.INFO, logger="sdrt"):
        c = load_components(path)
    assert c.scheduler_config["prediction_type"] == expected and not _warnings(caplog)


@pytest.mark.parametrize("model", ["sd2"], indirect=True)
@pytest.mark.parametrize("metadata, expected", [
    ({"modelspec.prediction_type": "epsilon"}, "epsilon"),
    ({"modelspec.prediction_type": "v"}, "v_prediction"),
    ({"modelspec.architecture": "stable-diffusion-v2-512"}, "epsilon"),
    ({"modelspec.architecture": "stable-diffusion-v2-768-v"}, "v_prediction"),
])
def test_safetensors_model_spec_decides(model, tmp_path, caplog, metadata, expected):
    path = _copy_with_tokenizer(model[4], tmp_path / "sd2.safetensors", metadata=metadata)
    with caplog.at_level(logging.INFO, logger="sdrt"):
        c = load_components(path)
    assert c.scheduler_config["prediction_type"] == expected and not _warnings(caplog)


@pytest.mark.parametrize("model", ["sd1"], indirect=True)
def test_v_pred_marker_tensor_decides(model, tmp_path):
    marked = dict(model[3], v_pred=torch.tensor([]))
    c = load_components(_copy_with_tokenizer(model[4], tmp_path / "m.safetensors", tensors=marked))
    assert c.scheduler_config["prediction_type"] == "v_prediction" and c.unet.config.sample_size == 64


@pytest.mark.parametrize("model", ["sd2"], indirect=True)
def test_ckpt_of_the_sd20_base_release_step_is_epsilon(model, tmp_path, caplog):
    kind, pipe, folder, _, _ = model
    ckpt = tmp_path / "base.ckpt"
    write_single_file(folder, ckpt, kind, pipe, global_step=875000)
    with caplog.at_level(logging.INFO, logger="sdrt"):
        assert load_components(ckpt).scheduler_config["prediction_type"] == "epsilon"
    assert not _warnings(caplog)


@pytest.mark.parametrize("model", ["sd2"], indirect=True)
def test_sd2_nine_channel_inpainting_file_is_epsilon(model, tmp_path, caplog):
    tensors = dict(model[3])
    key = "model.diffusion_model.input_blocks.0.0.weight"
    tensors[key] = torch.randn(tensors[key].shape[0], 9, *tensors[key].shape[2:])
    with caplog.at_level(logging.INFO, logger="sdrt"):
        c = load_components(_copy_with_tokenizer(model[4], tmp_path / "inpaint.safetensors", tensors=tensors))
    assert c.is_inpainting_unet and c.scheduler_config["prediction_type"] == "epsilon"
    assert c.unet.config.sample_size == 64 and not _warnings(caplog)


@pytest.mark.parametrize("model", ["sd1"], indirect=True)
def test_prediction_type_overrides_a_folders_scheduler_config_and_is_checked(model):
    folder = model[2]
    assert load_components(folder).scheduler_config["prediction_type"] == "epsilon"
    assert load_components(folder, prediction_type="v_prediction").scheduler_config["prediction_type"] == "v_prediction"
    for bad in ("v", "sample", 1):
        with pytest.raises(sdrt.InvalidInputError, match="prediction_type must be one of epsilon, v_prediction"):
            load_components(folder, prediction_type=bad)


@pytest.mark.parametrize("model", ["sd2"], indirect=True)
def test_cli_prediction_type_flag(model, tmp_path, caplog, capsys):
    from sdrt.cli import main
    from sdrt.png import read_parameters

    out = tmp_path / "out.png"
    args = ["generate", "a cat", "-o", str(out), "--model", str(model[4]), "--steps", "1", "--size", "16x16",
            "--device", "cpu", "--seed", "0"]
    with caplog.at_level(logging.WARNING, logger="sdrt"):
        assert main(args + ["--prediction-type", "epsilon"]) == 0
    assert not _warnings(caplog) and read_parameters(out)["prediction_type"] == "epsilon"
    with caplog.at_level(logging.WARNING, logger="sdrt"):
        assert main(args) == 0
    assert any("--prediction-type epsilon" in w for w in _warnings(caplog))
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(args + ["--prediction-type", "v"])
    assert info.value.code == 2 and "--prediction-type" in capsys.readouterr().err

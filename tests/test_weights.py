"""Checkpoint loading: bad input becomes a ModelLoadError naming the file or key; fp16 variants."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import sdrt
from factories import save_pipeline
from sdrt.components import load_component, load_components
from sdrt.weights import ALIGNMENT, read_tensors


UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def sd1_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("sd1")
    save_pipeline(path, "sd1")
    return path


@pytest.fixture
def model(sd1_folder, tmp_path):
    """A private copy of the sd1 folder, free to break."""
    return Path(shutil.copytree(sd1_folder, tmp_path / "model"))


def load_error(model_path, **kwargs) -> str:
    with pytest.raises(sdrt.ModelLoadError) as info:
        load_components(model_path, **kwargs)
    return str(info.value)


def rewrite_unet(model: Path, edit) -> Path:
    file = model / UNET_WEIGHTS
    tensors = load_file(str(file))
    edit(tensors)
    save_file(tensors, str(file))
    return file


# ------------------------------------------------------------------------------------- missing pieces
def test_missing_folder(tmp_path):
    assert str(tmp_path / "nowhere") in load_error(tmp_path / "nowhere")


def test_missing_weights_file(model):
    (model / UNET_WEIGHTS).unlink()
    assert str(model / "unet") in load_error(model)


def test_missing_component_folder(model):
    shutil.rmtree(model / "vae")
    assert str(model / "vae") in load_error(model)


@pytest.mark.parametrize("file", ["unet/config.json", "model_index.json", "scheduler/scheduler_config.json"])
def test_missing_config(model, file):
    (model / file).unlink()
    assert str(model / file) in load_error(model)


def test_invalid_json(model):
    (model / "unet/config.json").write_text('{"in_channels": 4,')
    message = load_error(model)
    assert str(model / "unet/config.json") in message and "JSON" in message


# ------------------------------------------------------------------------------------- tensor checks
def test_missing_tensor_key(model):
    key = "down_blocks.0.attentions.0.proj_in.weight"
    file = rewrite_unet(model, lambda t: t.pop(key))
    message = load_error(model)
    assert repr(key) in message and str(file) in message and "missing" in message


def test_unexpected_tensor_key(model):
    key = "down_blocks.0.extra.weight"
    file = rewrite_unet(model, lambda t: t.__setitem__(key, torch.zeros(3)))
    message = load_error(model)
    assert repr(key) in message and str(file) in message and "unexpected" in message


def test_wrong_tensor_shape(model):
    key = "conv_in.weight"
    file = rewrite_unet(model, lambda t: t.__setitem__(key, torch.zeros(32, 4, 1, 1)))
    message = load_error(model)
    assert repr(key) in message and str(file) in message and "(32, 4, 1, 1)" in message and "(32, 4, 3, 3)" in message


# ------------------------------------------------------------------------------------- damaged files
def test_truncated_safetensors(model):
    file = model / UNET_WEIGHTS
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    assert str(file) in load_error(model)


@pytest.mark.parametrize("garbage", [b"\x00" * 64, b"not a safetensors file at all" * 100, b""])
def test_corrupt_safetensors(model, garbage):
    file = model / UNET_WEIGHTS
    file.write_bytes(garbage)
    assert str(file) in load_error(model)


def test_corrupt_header_length(model):
    """A header length pointing past the end of the file."""
    file = model / UNET_WEIGHTS
    data = bytearray(file.read_bytes())
    data[:8] = (len(data) * 2).to_bytes(8, "little")
    file.write_bytes(bytes(data))
    assert str(file) in load_error(model)


def _touch(path: str) -> None:
    Path(path).touch()


class Payload:
    """Unpickling this calls _touch(marker): proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return _touch, (str(self.marker),)


def test_pickle_with_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "code-ran"
    file = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.x": torch.zeros(2), "payload": Payload(marker)}}, file)
    with pytest.raises(sdrt.ModelLoadError) as info:
        read_tensors(file)
    assert str(file) in str(info.value) and "refused" in str(info.value) and "_touch" in str(info.value)
    assert not marker.exists()
    with pytest.raises(sdrt.ModelLoadError):
        load_components(file)
    assert not marker.exists()


def test_pickle_that_is_not_a_dict_is_refused(tmp_path):
    file = tmp_path / "model.ckpt"
    torch.save([torch.zeros(2)], file)
    with pytest.raises(sdrt.ModelLoadError, match="expected a dict"):
        read_tensors(file)


@pytest.mark.parametrize("name", ["model.onnx", "model.gguf", "model"])
def test_unsupported_suffix(tmp_path, name):
    file = tmp_path / name
    file.write_bytes(b"\x00" * 16)
    message = load_error(file)
    assert str(file) in message and "unsupported" in message


def test_checkpoint_without_unet_is_refused(tmp_path):
    file = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down.weight": torch.zeros(2)}, str(file))
    assert str(file) in load_error(file)


# ------------------------------------------------------------------------------------- fp16 variants
def test_folder_with_only_fp16_variant_loads(tmp_path):
    pipe = save_pipeline(tmp_path / "fp32", "sd1")
    pipe.to(torch.float16).save_pretrained(str(tmp_path / "fp16"), variant="fp16")
    shutil.copytree(tmp_path / "fp32" / "tokenizer", tmp_path / "fp16" / "tokenizer", dirs_exist_ok=True)
    assert (tmp_path / "fp16" / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    assert not (tmp_path / "fp16" / UNET_WEIGHTS).exists()
    components = load_components(tmp_path / "fp16")
    for name, ref in (("unet", pipe.unet), ("vae", pipe.vae)):
        ours = getattr(components, name).state_dict()
        for key, value in ref.state_dict().items():
            assert ours[key].dtype == torch.float32
            assert torch.equal(ours[key], value.float()), key


def test_dtype_float16_prefers_fp16_file(model):
    full = load_file(str(model / UNET_WEIGHTS))
    # a distinguishable fp16 file: every weight negated
    save_file({k: (-v).half() for k, v in full.items()}, str(model / "unet" / "diffusion_pytorch_model.fp16.safetensors"))
    half = load_component(model / "unet", "unet", dtype=torch.float16).state_dict()
    single = load_component(model / "unet", "unet", dtype=torch.float32).state_dict()
    key = "conv_in.weight"
    assert half[key].dtype == torch.float16 and torch.equal(half[key], (-full[key]).half())
    assert single[key].dtype == torch.float32 and torch.equal(single[key], full[key])
    assert torch.equal(load_components(model, dtype=torch.float16).unet.state_dict()[key], (-full[key]).half())


# ------------------------------------------------------------------------------------- alignment
def test_weights_are_aligned_whatever_their_file_offsets(model):
    """Memory-mapped tensors sit at arbitrary file offsets; BLAS rounds differently on unaligned data, so every
    weight must land in aligned memory (else a folder and a single file with the same tensors differ)."""
    assert any(t.data_ptr() % ALIGNMENT for t in read_tensors(model / UNET_WEIGHTS).values())  # the premise
    unet = load_components(model).unet
    misaligned = [k for k, t in unet.state_dict().items() if t.data_ptr() % ALIGNMENT]
    assert not misaligned, misaligned[:3]

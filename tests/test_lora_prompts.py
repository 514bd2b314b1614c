"""<lora:NAME:WEIGHT> prompt tags on a pipeline loaded with lora_dirs=, the parsed-file cache, and the in-place
first fuse: tags give exactly the weights (and latents) of the same LoRAs loaded by hand; weights compared with
torch.equal, latents with torch.equal (same weights, same call)."""
from __future__ import annotations

import os
import shutil

import pytest
import torch

import sdrt
from sdrt.errors import InvalidInputError

from factories import save_pipeline
from lora_files import write_kohya, write_peft

GEN = dict(steps=2, height=16, width=16, seed=3, output="latent")


def _weights(pipe) -> dict[str, torch.Tensor]:
    return {f"{part}.{k}": v.clone() for part in ("unet", "text_encoder")
            for k, v in getattr(pipe, part).state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-tags")
    reference = save_pipeline(root / "model", "sd1")
    (root / "loras" / "sub").mkdir(parents=True)
    write_kohya(root / "loras" / "detail.safetensors", reference, seed=1, alpha=2.0)
    write_peft(root / "loras" / "sub" / "style.safetensors", reference, seed=2)
    return root


def test_tags_fuse_for_their_call_and_equal_loading_by_hand(setup):
    root = setup
    pipe = sdrt.load(root / "model", device="cpu", dtype="float32", lora_dirs=[root / "loras"])
    before = _weights(pipe)
    tagged = pipe("a red cube <lora:detail:0.7> <lora:style:0.4>", **GEN).latents
    assert pipe.loras == {"detail": 0.7, "style": 0.4} and pipe.tag_loras == {"detail", "style"}
    by_tags = _weights(pipe)

    manual = sdrt.load(root / "model", device="cpu", dtype="float32")
    manual.load_lora(root / "loras" / "detail.safetensors", scale=0.7)
    manual.load_lora(root / "loras" / "sub" / "style.safetensors", scale=0.4)
    assert _same(by_tags, _weights(manual))
    assert torch.equal(tagged, manual("a red cube  ", **GEN).latents)  # the tags leave their spaces

    pipe("a red cube <lora:style:0.4>", **GEN)  # detail is no longer named: unloaded
    assert pipe.loras == {"style": 0.4}
    pipe("a red cube", **GEN)  # no tags: no tag LoRAs
    assert pipe.loras == {} and _same(before, _weights(pipe))


def test_tag_errors_name_the_problem_and_change_nothing(setup):
    root = setup
    pipe = sdrt.load(root / "model", device="cpu", dtype="float32", lora_dirs=[root / "loras"])
    pipe("x <lora:detail:0.5>", **GEN)
    before = _weights(pipe)
    with pytest.raises(InvalidInputError, match=r"unknown LoRA 'nope'.*loras"):
        pipe("x <lora:nope:1>", **GEN)
    with pytest.raises(InvalidInputError, match="same <lora:...> tags"):
        pipe(["x <lora:detail:0.5>", "y"], **GEN)
    with pytest.raises(InvalidInputError, match="negative_prompt"):
        pipe("x", negative_prompt="<lora:detail:1>", **GEN)
    with pytest.raises(InvalidInputError, match="finite number"):
        pipe("x <lora:detail:lots>", **GEN)
    assert pipe.loras == {"detail": 0.5} and _same(before, _weights(pipe))

    plain = sdrt.load(root / "model", device="cpu", dtype="float32")
    with pytest.raises(InvalidInputError, match="lora_dirs"):
        plain("x <lora:detail:1>", **GEN)
    plain.load_lora(root / "loras" / "detail.safetensors")
    plain.lora_dirs = [root / "loras"]
    with pytest.raises(InvalidInputError, match="load_lora"):  # tags never touch LoRAs loaded by hand
        plain("x <lora:detail:0.2>", **GEN)
    with pytest.raises(InvalidInputError, match="not a folder"):
        sdrt.load(root / "model", device="cpu", dtype="float32", lora_dirs=[root / "missing"])


def test_switching_paths_give_identical_weights_and_the_cache_sees_edited_files(setup, tmp_path):
    root = setup
    a, b = root / "loras" / "detail.safetensors", tmp_path / "style.safetensors"
    shutil.copy(root / "loras" / "sub" / "style.safetensors", b)
    pipe = sdrt.load(root / "model", device="cpu", dtype="float32")
    pipe.load_lora(a, name="a")
    pipe.unload_lora("a")
    pipe.load_lora(b, scale=0.6, name="b")  # in place on the restored weights
    in_place = _weights(pipe)
    pipe.unload_lora()
    pipe.load_lora(a, name="a")
    with pipe.batch_lora_changes():  # from the kept originals, one pass
        pipe.unload_lora("a")
        pipe.load_lora(b, scale=0.6, name="b")
    assert _same(in_place, _weights(pipe))
    assert len(pipe._lora_cache) == 2

    reference_like = sdrt.load(root / "model", device="cpu", dtype="float32")
    pipe.unload_lora()
    write_kohya(b, _Shapes(reference_like), seed=9, alpha=1.0)  # same path, new contents
    os.utime(b, ns=(1, 1))  # a different mtime even on a coarse clock
    pipe.load_lora(b, name="b")
    reference_like.load_lora(b, name="b")
    assert _same(_weights(pipe), _weights(reference_like))


class _Shapes:
    """What write_kohya reads of a diffusers pipeline, from an sdrt one (same module names)."""

    def __init__(self, pipe):
        self.unet, self.text_encoder = pipe.unet, pipe.text_encoder

"""Textual inversion: each file format against diffusers' load_textual_inversion on the same random embedding
file (tiny random SD 1.x, CPU float32, final latents <= 1e-3 as tests/test_pipeline.py), multi-vector tokens
at a chunk boundary, and the refusals (wrong width, pickles that are more than tensors)."""
from __future__ import annotations

import collections

import pytest
import safetensors.torch
import torch

import sdrt
from factories import save_pipeline

LATENT_TOL = 1e-3
WIDTH = 128  # the factory's text width


def _vectors(n, seed, width=WIDTH):
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed)) * 0.5


def _a1111_pt(path, vectors):
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": "trained-name",
                "step": 1500, "sd_checkpoint": "abcd1234", "sd_checkpoint_name": "sd15"}, path)


def _kohya_safetensors(path, vectors):
    safetensors.torch.save_file({"emb_params": vectors.contiguous()}, str(path))


def _diffusers_bin(path, vectors):
    torch.save({"<learned>": vectors[0]}, path)  # one vector, stored 1-D as diffusers' training script does


def _diffusers_safetensors(path, vectors):
    safetensors.torch.save_file({"<learned-4>": vectors.contiguous()}, str(path))


FORMATS = {  # name -> (writer, file name, vectors, token diffusers is given)
    "a1111_pt": (_a1111_pt, "style-a.pt", 3, "style-a"),
    "kohya_safetensors": (_kohya_safetensors, "style-k.safetensors", 2, "style-k"),
    "diffusers_bin": (_diffusers_bin, "learned_embeds.bin", 1, "<learned>"),
    "diffusers_safetensors": (_diffusers_safetensors, "learned_embeds.safetensors", 4, "<learned-4>"),
}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """One sdrt and one diffusers pipeline on the same weights; the tests load distinct tokens into both."""
    path = tmp_path_factory.mktemp("sd1")
    reference = save_pipeline(path, "sd1")
    return sdrt.load(path, device="cpu", dtype="float32"), reference


@pytest.mark.parametrize("fmt", FORMATS)
def test_same_picture_as_diffusers(pair, fmt, tmp_path):
    pipe, reference = pair
    write, name, n, token = FORMATS[fmt]
    file = tmp_path / name
    write(file, _vectors(n, seed=len(fmt)))
    assert pipe.load_textual_inversion(file) == token  # default token: the diffusers key, else the file stem
    reference.load_textual_inversion(str(file), token=token)
    prompt = f"a photo of {token} on a mat"
    ours = pipe(prompt, negative_prompt="blurry", steps=3, seed=2, output="latent").latents
    theirs = reference(prompt, negative_prompt="blurry", num_inference_steps=3, output_type="latent",
                       generator=torch.Generator("cpu").manual_seed(2)).images
    without = pipe("a photo of on a mat", negative_prompt="blurry", steps=3, seed=2, output="latent").latents
    assert (ours - theirs).abs().max().item() <= LATENT_TOL
    assert (ours - without).abs().max().item() > 10 * LATENT_TOL  # the embedding is used


def test_explicit_token_and_emphasis(pair, tmp_path):
    pipe, _ = pair
    file = tmp_path / "thing.pt"
    _a1111_pt(file, _vectors(2, seed=1))
    assert pipe.load_textual_inversion(file, token="<thing>") == "<thing>"
    with pytest.raises(sdrt.InvalidInputError, match="already loaded"):
        pipe.load_textual_inversion(file, token="<thing>")
    result = pipe("a (<thing>:1.3), red", steps=1, seed=0, output="latent")
    assert torch.isfinite(result.latents).all()


def test_multi_vector_token_is_never_split_across_chunks(pair, tmp_path):
    from sdrt.prompt_encoding import PromptOptions, prompt_chunks
    pipe, _ = pair
    file = tmp_path / "five.safetensors"
    _kohya_safetensors(file, _vectors(5, seed=3))
    pipe.load_textual_inversion(file, token="<five>")
    ids = pipe.embedding_tokens["<five>"]
    tok = pipe.tokenizer
    a = tok.token_ids(["a"])[0][0]
    chunks = prompt_chunks("a " * 72 + "<five> end", tok, PromptOptions(), pipe.embedding_tokens)
    assert len(chunks) == 2
    assert chunks[0].ids[1:74] == [a] * 72 + [tok.eos_token_id]  # 72 words, then EOS: 5 vectors did not fit
    assert chunks[1].ids[1:7] == ids + tok.token_ids(["end"])[0]
    context = pipe.text_encoder(torch.tensor([c.ids for c in chunks]))
    assert context.shape == (2, 77, WIDTH)


def test_wrong_width_names_file_and_both_widths(pair, tmp_path):
    pipe, _ = pair
    file = tmp_path / "sd2-style.pt"
    _a1111_pt(file, _vectors(2, seed=0, width=1024))
    with pytest.raises(sdrt.InvalidInputError, match=r"sd2-style\.pt.*1024 wide.*takes 128"):
        pipe.load_textual_inversion(file)
    assert "sd2-style" not in pipe.embedding_tokens


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


@pytest.mark.parametrize("content, match", [
    ({"emb_params": _Payload()}, "weights_only"),
    ({"a": torch.zeros(1, WIDTH), "b": torch.zeros(1, WIDTH)}, "not a textual-inversion embedding"),
    ({"clip_l": torch.zeros(1, 768), "clip_g": torch.zeros(1, 1280)}, "SDXL"),
    ({"emb_params": torch.zeros(2, 3, WIDTH)}, r"\[D\] or \[n, D\]"),
    ({"emb_params": torch.full((1, WIDTH), float("nan"))}, "NaN"),
    (collections.OrderedDict(string_to_param={"*": torch.zeros(76, WIDTH)}), "at most 75"),
])
def test_bad_files_are_refused(pair, tmp_path, content, match, capsys):
    pipe, _ = pair
    file = tmp_path / "bad.pt"
    torch.save(content, file)
    with pytest.raises(sdrt.InvalidInputError, match=match):
        pipe.load_textual_inversion(file)
    assert "must never run" not in capsys.readouterr().out
    with pytest.raises(sdrt.InvalidInputError, match="no such file"):
        pipe.load_textual_inversion(tmp_path / "missing.pt")

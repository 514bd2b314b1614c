"""SDXL prompts as users write them (sdrt.sdxl_prompts): textual inversion (clip_l + clip_g files) and clip_skip
against diffusers' SDXL pipelines on the same random tiny weights (final latents <= 1e-3, as
tests/test_sdxl_pipeline.py); long prompts and emphasis against embeddings computed here from transformers'
hidden states of hand-built chunks (max abs <= 1e-5: the same float32 math in another implementation)."""
from __future__ import annotations

import pytest
import safetensors.torch
import torch

import sdrt
from sdxl_factories import load_sdxl_pairs

LATENT_TOL = 1e-3
STATE_TOL = 1e-5
WIDTHS = {"clip_l": 64, "clip_g": 64}  # the tiny factory's encoder widths


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """"base" / "refiner" -> (sdrt pipeline, diffusers pipeline, folder)."""
    return load_sdxl_pairs(tmp_path_factory)


def _sdxl_embedding(path, n, seed, widths=WIDTHS):
    g = torch.Generator().manual_seed(seed)
    tensors = {key: torch.randn(n, width, generator=g) * 0.5 for key, width in widths.items()}
    safetensors.torch.save_file(tensors, str(path))
    return tensors


def _latents(pipe, reference, prompt, seed=3, steps=3, **kwargs):
    """sdrt's and diffusers' final latents; both run the folder's Euler scheduler, guidance 5."""
    ours = pipe(prompt, negative_prompt="blurry", steps=steps, seed=seed, output="latent", scheduler="euler",
                guidance_scale=5.0, **kwargs).latents
    theirs = reference(prompt, negative_prompt="blurry", num_inference_steps=steps, output_type="latent",
                       guidance_scale=5.0,
                       generator=torch.Generator("cpu").manual_seed(seed), **kwargs).images
    return ours, theirs


@pytest.mark.parametrize("name", ["base", "refiner"])
def test_textual_inversion_same_picture_as_diffusers(models, name, tmp_path):
    pipe, reference, _ = models[name]
    token = f"sdxl-style-{name}"
    vectors = _sdxl_embedding(tmp_path / f"{token}.safetensors", n=2, seed=len(name))
    assert pipe.load_textual_inversion(tmp_path / f"{token}.safetensors") == token  # the file's stem
    # diffusers' SDXL recipe: each encoder's vectors loaded on their own
    reference.load_textual_inversion(vectors["clip_g"], token=token, text_encoder=reference.text_encoder_2,
                                     tokenizer=reference.tokenizer_2)
    if name == "base":
        reference.load_textual_inversion(vectors["clip_l"], token=token, text_encoder=reference.text_encoder,
                                         tokenizer=reference.tokenizer)
    image = None if name == "base" else torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    extra = {} if image is None else {"image": image, "strength": 0.6}
    ours, theirs = _latents(pipe, reference, f"a photo of {token} on a mat", **extra)
    without = pipe("a photo of on a mat", negative_prompt="blurry", steps=3, seed=3, output="latent",
                   scheduler="euler", **extra).latents
    assert (ours - theirs).abs().max().item() <= LATENT_TOL
    assert (ours - without).abs().max().item() > 10 * LATENT_TOL  # the embedding is used


def test_clip_skip_same_picture_as_diffusers(models):
    pipe, reference, _ = models["base"]
    # diffusers skips layers for the prompt only and encodes negative_prompt at hidden_states[-2]; sdrt (like
    # A1111) skips for both, so diffusers gets the negative as embeddings skipped the same way
    states, pooled = [], None
    for tokenizer, encoder in ((reference.tokenizer, reference.text_encoder),
                               (reference.tokenizer_2, reference.text_encoder_2)):
        ids = tokenizer(["blurry"], padding="max_length", max_length=77, return_tensors="pt").input_ids
        with torch.no_grad():
            out = encoder(ids, output_hidden_states=True)
        states.append(out.hidden_states[-3])
        pooled = getattr(out, "text_embeds", pooled)
    prompt = "a red house by a lake"
    ours = pipe(prompt, negative_prompt="blurry", steps=3, seed=3, output="latent", scheduler="euler",
                guidance_scale=5.0, clip_skip=1).latents
    theirs = reference(prompt, negative_prompt_embeds=torch.cat(states, dim=-1), negative_pooled_prompt_embeds=pooled,
                       num_inference_steps=3, output_type="latent", guidance_scale=5.0, clip_skip=1,
                       generator=torch.Generator("cpu").manual_seed(3)).images
    plain = pipe(prompt, negative_prompt="blurry", steps=3, seed=3, output="latent", scheduler="euler",
                 guidance_scale=5.0).latents
    assert (ours - theirs).abs().max().item() <= LATENT_TOL
    assert (ours - plain).abs().max().item() > 10 * LATENT_TOL  # the option does something


def _chunk_states(reference, token_ids: list[int], weights: list[float] | None = None):
    """What A1111 does, computed with transformers: BOS + ids + EOS + padding per encoder, hidden_states[-2],
    each token scaled by its weight and the mean restored per encoder; -> (context [1, 77, D1 + D2],
    text_embeds [1, P])."""
    weights = weights or [1.0] * len(token_ids)
    states = []
    for tokenizer, encoder in ((reference.tokenizer, reference.text_encoder),
                               (reference.tokenizer_2, reference.text_encoder_2)):
        pad = 75 - len(token_ids)
        ids = torch.tensor([[tokenizer.bos_token_id, *token_ids, tokenizer.eos_token_id] + [tokenizer.pad_token_id] * pad])
        w = torch.tensor([1.0, *weights, 1.0] + [1.0] * pad)[None, :, None]
        with torch.no_grad():
            out = encoder(ids, output_hidden_states=True)
        z = out.hidden_states[-2]
        scaled = z * w
        states.append(scaled * (z.mean() / scaled.mean()))
        text_embeds = getattr(out, "text_embeds", None)
    return torch.cat(states, dim=-1), text_embeds


def test_a_long_prompt_is_three_chunks_encoded_on_their_own(models):
    pipe, reference, _ = models["base"]
    words = " ".join(["red", "house", "blue", "lake", "tall", "tree", "small", "cat"] * 20)  # 160 tokens
    ids = reference.tokenizer(words, add_special_tokens=False).input_ids
    assert len(ids) == 160
    context, text_embeds = pipe._encode_text([words])
    assert tuple(context.shape) == (1, 231, 128)
    chunks = [_chunk_states(reference, ids[i:i + 75]) for i in (0, 75, 150)]
    expected = torch.cat([c for c, _ in chunks], dim=1)
    assert (context - expected).abs().max().item() <= STATE_TOL
    assert (text_embeds - chunks[0][1]).abs().max().item() <= STATE_TOL  # pooled: the first chunk's


def test_emphasis_weights_each_encoders_states(models):
    pipe, reference, _ = models["base"]
    context, _ = pipe._encode_text(["a (red:1.5) house, [blue] lake"])
    plain = reference.tokenizer
    ids, weights = [], []
    for text, weight in (("a", 1.0), ("red", 1.5), ("house,", 1.0), ("blue", 1 / 1.1), ("lake", 1.0)):
        piece = plain(text, add_special_tokens=False).input_ids
        ids += piece
        weights += [weight] * len(piece)
    expected, _ = _chunk_states(reference, ids, weights)
    assert (context - expected).abs().max().item() <= STATE_TOL


def test_break_and_negatives_share_the_chunk_count(models):
    pipe, _, _ = models["base"]
    result = pipe("a house BREAK a lake", negative_prompt="blurry", steps=1, seed=0, output="latent")
    assert torch.isfinite(result.latents).all()
    context, _ = pipe._encode_text(["a house BREAK a lake"])
    assert context.shape[1] == 154


def test_bad_sdxl_embeddings_are_refused(models, tmp_path):
    pipe, _, _ = models["base"]
    one_encoder = tmp_path / "sd15-style.safetensors"
    safetensors.torch.save_file({"emb_params": torch.zeros(1, 64)}, str(one_encoder))
    with pytest.raises(sdrt.InvalidInputError, match="one-encoder model"):
        pipe.load_textual_inversion(one_encoder)
    uneven = tmp_path / "uneven.safetensors"
    safetensors.torch.save_file({"clip_l": torch.zeros(2, 64), "clip_g": torch.zeros(3, 64)}, str(uneven))
    with pytest.raises(sdrt.InvalidInputError, match="clip_l holds 2 vectors but clip_g 3"):
        pipe.load_textual_inversion(uneven)
    wide = tmp_path / "wide.safetensors"
    _sdxl_embedding(wide, 1, 0, {"clip_l": 64, "clip_g": 1280})
    with pytest.raises(sdrt.InvalidInputError, match="clip_g: the embedding is 1280 wide .* takes 64"):
        pipe.load_textual_inversion(wide)
    assert "wide" not in pipe.embedding_tokens  # nothing half-loaded: encoder 1 untouched too
    with pytest.raises(sdrt.InvalidInputError, match="clip_skip must be"):
        pipe("a cat", steps=1, seed=0, clip_skip=3)


def test_an_sdxl_embedding_on_sd1_is_refused(tmp_path):
    from factories import save_pipeline
    save_pipeline(tmp_path / "sd1", "sd1")
    pipe = sdrt.load(tmp_path / "sd1", device="cpu", dtype="float32")
    file = tmp_path / "xl.safetensors"
    _sdxl_embedding(file, 1, 0)
    with pytest.raises(sdrt.InvalidInputError, match="an SDXL embedding"):
        pipe.load_textual_inversion(file)

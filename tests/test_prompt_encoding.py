"""Long prompts (75-token chunks, BREAK), emphasis weights and clip_skip, on a tiny random SD 1.x model.

Reference values are computed independently: chunk ids written out from the tokenizer's plain token ids,
weights written by hand, transformers' hidden states, diffusers' `clip_skip`. Tolerances: float32 CPU;
text embeddings vs transformers <= 1e-5, final latents vs diffusers <= 1e-3 (as tests/test_pipeline.py).
"""
from __future__ import annotations

import logging

import pytest
import torch

import sdrt
from factories import save_pipeline
from sdrt.prompt_encoding import MAX_CHUNKS

EMBED_TOL = 1e-5
LATENT_TOL = 1e-3


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    path = tmp_path_factory.mktemp("sd1")
    reference = save_pipeline(path, "sd1")
    return sdrt.load(path, device="cpu", dtype="float32"), reference


def _chunk(tok, ids):
    """BOS + ids + EOS + padding: one 77-id chunk written out by hand."""
    return [tok.bos_token_id, *ids, tok.eos_token_id] + [tok.pad_token_id] * (75 - len(ids))


def _encode(pipe, texts, **options):
    from sdrt.prompt_encoding import PromptOptions, encode_prompt_pair
    cond, _ = encode_prompt_pair(pipe.text_encoder, pipe.tokenizer, texts, None, PromptOptions(**options),
                                 pipe.embedding_tokens, pipe.device)
    return cond


def test_short_prompt_gives_exactly_todays_embeddings(models):
    pipe, _ = models
    texts = ["a photo of a red cat", "", "a " * 75]
    today = pipe.text_encoder(pipe.tokenizer(texts))
    assert torch.equal(_encode(pipe, texts), today)
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    common = dict(steps=2, output="latent", latents=latents, guidance_scale=1.0)
    assert torch.equal(pipe(texts, **common).latents, pipe(prompt_embeds=today, **common).latents)


def test_160_token_prompt_is_three_chunks_encoded_separately(models):
    pipe, _ = models
    tok = pipe.tokenizer
    words = [f"w{i % 10}" for i in range(80)]  # "w3" is 2 tokens: 160 tokens
    text = " ".join(words)
    ids = tok.token_ids([text])[0]
    assert len(ids) == 160
    expected = torch.cat([pipe.text_encoder(torch.tensor([_chunk(tok, part)]))
                          for part in (ids[:75], ids[75:150], ids[150:])], dim=1)
    got = _encode(pipe, [text, "a cat"])
    assert got.shape == (2, 231, 128)
    assert torch.equal(got[:1], expected)
    empty = pipe.text_encoder(torch.tensor([_chunk(tok, [])]))
    short = pipe.text_encoder(tok(["a cat"]))
    assert torch.equal(got[1:], torch.cat([short, empty, empty], dim=1))  # padded with empty chunks


def test_break_starts_a_new_chunk(models):
    pipe, _ = models
    tok = pipe.tokenizer
    got = _encode(pipe, ["a red cat BREAK on a mat"])
    expected = torch.cat([pipe.text_encoder(torch.tensor([_chunk(tok, tok.token_ids([t])[0])]))
                          for t in ("a red cat", "on a mat")], dim=1)
    assert torch.equal(got, expected)


def test_negative_prompt_is_padded_to_the_prompts_chunks(models):
    pipe, _ = models
    seen = []
    unet = pipe.unet
    pipe.unet = lambda x, t, context: seen.append(context.shape) or unet(x, t, context)
    try:
        pipe("cat " * 100, negative_prompt="blurry", steps=1, output="latent", seed=0)
        pipe("cat", negative_prompt="blurry " * 200, steps=1, output="latent", seed=0)
    finally:
        pipe.unet = unet
    assert seen == [(2, 154, 128), (2, 231, 128)]


def test_chunking_off_truncates_with_todays_warning(models, caplog):
    pipe, _ = models
    text = "a " * 80 + "b"
    with caplog.at_level(logging.WARNING):
        got = _encode(pipe, [text], chunking=False)
    assert torch.equal(got, pipe.text_encoder(pipe.tokenizer([text])))
    assert any("last 6 tokens are dropped" in r.getMessage() for r in caplog.records)


def test_too_many_chunks_is_refused(models):
    pipe, _ = models
    with pytest.raises(sdrt.InvalidInputError, match="chunks"):
        pipe("a " * (75 * MAX_CHUNKS + 1), steps=1, output="latent")


@pytest.fixture
def biased_final_norm(models):
    """A final layer norm with a nonzero bias, as trained CLIP has: a freshly initialised one (bias 0) gives
    every chunk a mean of ~1e-9, and restoring a mean of ~0 is ill-conditioned."""
    norm = models[0].text_encoder.text_model.final_layer_norm
    saved = norm.bias.detach().clone()
    with torch.no_grad():
        norm.bias.copy_(0.1 + 0.05 * torch.randn(saved.shape, generator=torch.Generator().manual_seed(0)))
    yield
    with torch.no_grad():
        norm.bias.copy_(saved)


def test_emphasis_weights_match_hand_computed_embeddings(models, biased_final_norm):
    pipe, _ = models
    tok = pipe.tokenizer
    text = "a (red:1.5) [cat] ((on)) mat"
    # fragments "a ", "red", " ", "cat", " ", "on", " mat" tokenized one by one; their weights by hand
    pieces = [("a", 1.0), ("red", 1.5), ("cat", 1 / 1.1), ("on", 1.21), ("mat", 1.0)]
    ids = [i for word, _ in pieces for i in tok.token_ids([word])[0]]
    weights = torch.tensor([1.0] + [w for word, w in pieces for _ in tok.token_ids([word])[0]]
                           + [1.0] * (76 - len(ids)), dtype=torch.float64)
    z = pipe.text_encoder(torch.tensor([_chunk(tok, ids)]))[0].double()  # [77, D]
    scaled = z * weights[:, None]
    original = scaled * (z.mean() / scaled.mean())
    assert torch.allclose(_encode(pipe, [text])[0].double(), original, atol=EMBED_TOL, rtol=0)
    assert torch.allclose(_encode(pipe, [text], emphasis="no_norm")[0].double(), scaled, atol=EMBED_TOL, rtol=0)
    literal = pipe.text_encoder(pipe.tokenizer([text]))
    assert torch.equal(_encode(pipe, [text], emphasis="none"), literal)


def test_weighted_prompt_runs_and_differs(models):
    pipe, _ = models
    plain = pipe("a red cat", steps=2, output="latent", seed=3).latents
    weighted = pipe("a (red:1.6) cat", steps=2, output="latent", seed=3).latents
    assert torch.isfinite(weighted).all() and not torch.equal(plain, weighted)


def _skipped_by_transformers(reference, ids):
    with torch.no_grad():
        out = reference.text_encoder(ids, output_hidden_states=True)
        return reference.text_encoder.final_layer_norm(out.hidden_states[-2])


def test_clip_skip_equals_transformers_hidden_state(models):
    pipe, reference = models
    ids = pipe.tokenizer(["a photo of a red cat", "blurry"])
    got = pipe.text_encoder(ids, clip_skip=1)
    assert (got - _skipped_by_transformers(reference, ids)).abs().max().item() <= EMBED_TOL


def test_clip_skip_pipeline_matches_diffusers(models):
    pipe, reference = models
    # diffusers' clip_skip reads text_encoder.text_model.final_layer_norm; transformers 5's CLIPTextModel holds
    # final_layer_norm itself (not a registered submodule, so nothing else sees this alias)
    if not hasattr(reference.text_encoder, "text_model"):
        object.__setattr__(reference.text_encoder, "text_model", reference.text_encoder)
    # diffusers skips layers for the prompt only and encodes negative_prompt in full; sdrt (like A1111) skips
    # for both, so diffusers gets the negative as embeddings skipped the same way
    negative = _skipped_by_transformers(reference, pipe.tokenizer(["blurry"]))
    prompt = "a photo of a red cat"
    ours = pipe(prompt, negative_prompt="blurry", steps=3, seed=5, output="latent", clip_skip=1).latents
    theirs = reference(prompt, negative_prompt_embeds=negative, num_inference_steps=3, output_type="latent",
                       generator=torch.Generator("cpu").manual_seed(5), clip_skip=1).images
    plain = pipe(prompt, negative_prompt="blurry", steps=3, seed=5, output="latent").latents
    assert (ours - theirs).abs().max().item() <= LATENT_TOL
    assert (ours - plain).abs().max().item() > 10 * LATENT_TOL  # the option does something


@pytest.mark.parametrize("kwargs, match", [
    ({"clip_skip": 2}, "clip_skip"), ({"clip_skip": -1}, "clip_skip"), ({"clip_skip": "1"}, "clip_skip"),
    ({"emphasis": "loud"}, "emphasis"), ({"prompt_chunking": "yes"}, "prompt_chunking"),
])
def test_bad_prompt_options(models, kwargs, match):
    pipe, _ = models
    with pytest.raises(sdrt.InvalidInputError, match=match):
        pipe("a cat", steps=1, output="latent", **kwargs)


def test_serve_runs_prompts_that_may_need_chunks_alone():
    from sdrt.serve.jobs import GenerationJob, batch_key

    def job(prompt, negative=""):
        return GenerationJob("txt2img", prompt, negative, (0,), 7.5, 2, "ddim", 0.0, 64, 64)
    assert batch_key(job("a red circle")) is not None
    assert batch_key(job("x" * 76)) is None and batch_key(job("a", negative="a BREAK b")) is None
    assert batch_key(job("é" * 38)) is None  # 76 UTF-8 bytes: may be 76 tokens

"""SDXL's modules vs diffusers/transformers on random tiny weights saved with save_pretrained: the U-Net with
transformer_layers_per_block (1, 2), a level without attention and the "text_time" embedding; both text
encoders' penultimate hidden states, the second's pooled text_embeds. Tolerance: max abs <= 1e-4 (the issue's)."""
from __future__ import annotations

import pytest
import torch

from sdrt.components import load_component
from sdrt.errors import InvalidInputError
from sdxl_factories import PROJECTION, TIME_DIM, diffusers_sdxl

TOL = 1e-4


@pytest.fixture(scope="module", params=[False, True], ids=["base", "refiner"])
def saved(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("sdxl")
    pipe = diffusers_sdxl(refiner=request.param)
    pipe.save_pretrained(str(path), safe_serialization=True)
    return request.param, pipe, path


def test_unet_matches_diffusers(saved):
    refiner, reference, path = saved
    unet = load_component(path / "unet", "unet")
    n_ids = 5 if refiner else 6
    torch.manual_seed(1)
    x, context = torch.randn(2, 4, 8, 10), torch.randn(2, 77, reference.unet.config.cross_attention_dim)
    text_embeds = torch.randn(2, PROJECTION)
    time_ids = torch.tensor([[16.0, 20, 0, 0, 16, 20][:n_ids], [32.0, 24, 4, 8, 16, 20][:n_ids]])
    for t in (torch.tensor(999), torch.tensor([10, 500])):
        with torch.no_grad():
            want = reference.unet(x, t, context, added_cond_kwargs={"text_embeds": text_embeds,
                                                                    "time_ids": time_ids}).sample
            got = unet(x, t, context, text_embeds=text_embeds, time_ids=time_ids)
        assert (got - want).abs().max().item() <= TOL


def test_unet_needs_added_conditioning(saved):
    _, _, path = saved
    unet = load_component(path / "unet", "unet")
    with pytest.raises(InvalidInputError, match="text_embeds and time_ids"):
        unet(torch.randn(1, 4, 8, 8), 10, torch.randn(1, 77, unet.config.cross_attention_dim))
    with pytest.raises(InvalidInputError, match=str(unet.config.projection_class_embeddings_input_dim)):
        unet(torch.randn(1, 4, 8, 8), 10, torch.randn(1, 77, unet.config.cross_attention_dim),
             text_embeds=torch.randn(1, PROJECTION), time_ids=torch.zeros(1, 3))
    assert unet.config.addition_time_embed_dim == TIME_DIM

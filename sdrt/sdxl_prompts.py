"""SDXL prompts as users write them: AUTOMATIC1111's 75-token chunks, emphasis and textual inversion, through
both text encoders.

Each encoder tokenizes the prompt with its own tokenizer (their pad tokens differ) and its own textual-inversion
ids, and encodes the chunks of `sdrt.prompt_encoding` (BOS + 75 + EOS each, BREAK, one chunk count for the
prompts and negatives of a call). Each encoder's penultimate states get the emphasis weights and, under
"original", have their mean restored on their own (A1111 does it per embedder); the two encoders' states are
then concatenated along the channels. The pooled, projected `text_embeds` come from the second encoder's
first chunk, as in A1111. A prompt of at most 75 tokens without emphasis has exactly the ids diffusers' SDXL
pipelines give it, so the same embeddings.
clip_skip=N (diffusers' SDXL meaning): each encoder's output 1 + N layers before the last, without the final
norm (N=0 is SDXL's usual penultimate layer); the pooled output always comes from the last layer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import torch

from sdrt.prompt_encoding import PromptOptions, chunk_tensors, prompt_chunks, weighted
from sdrt.tokenizer import CLIPTokenizer


@dataclass
class SDXLEncoder:
    """One of SDXL's text encoders with what encodes a prompt for it. The last one of a model is the projected
    one (`sdxl_states`); an exported graph stands in for the module on the onnxruntime backend."""
    text_encoder: Any
    tokenizer: CLIPTokenizer
    embeddings: Mapping[str, Sequence[int]]  # textual inversion: token -> this encoder's ids for its vectors


Encoded = tuple[torch.Tensor, torch.Tensor]  # (context [B, 77k, D1 + D2], text_embeds [B, projection_dim])


def encode_sdxl_pair(encoders: Sequence[SDXLEncoder], prompts: Optional[list[str]], negatives: Optional[list[str]],
                     options: PromptOptions, device: torch.device,
                     min_chunks: int = 1) -> tuple[Optional[Encoded], Optional[Encoded]]:
    """(cond, uncond), each (context, text_embeds) or None where its texts are None; one chunk count k for
    both, at least min_chunks."""
    chunks = [[None if texts is None else [prompt_chunks(t, e.tokenizer, options, e.embeddings, i)
                                           for i, t in enumerate(texts)] for texts in (prompts, negatives)]
              for e in encoders]
    k = max([min_chunks] + [len(c) for per_encoder in chunks for side in per_encoder if side for c in side])
    return tuple(None if texts is None else _encode([(e, per_encoder[side]) for e, per_encoder in zip(encoders, chunks)],
                                                    k, options, device)
                 for side, texts in enumerate((prompts, negatives)))


def _encode(encoders: list, k: int, options: PromptOptions, device: torch.device) -> Encoded:
    states, text_embeds = [], None
    for i, (encoder, prompts) in enumerate(encoders):
        ids, weights = chunk_tensors(encoder.tokenizer, prompts, k)
        b, _, n = ids.shape
        flat = ids.view(b * k, n).to(device)
        skip = (options.clip_skip,) if options.clip_skip else ()  # exported graphs know no clip_skip
        if i == len(encoders) - 1:
            z, embeds = encoder.text_encoder.sdxl_states(flat, *skip)
            text_embeds = embeds.view(b, k, -1)[:, 0]
        else:
            z = encoder.text_encoder.penultimate(flat, *skip)[0]
        states.append(weighted(z, weights.view(b * k, n), options).reshape(b, k * n, z.shape[-1]))
    return torch.cat(states, dim=-1), text_embeds

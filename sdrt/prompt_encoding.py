"""Prompts as users write them -> the U-Net's context [B, 77*k, D], AUTOMATIC1111's way.

The token stream of a prompt (emphasis parsed by `sdrt.prompt_parser`, textual-inversion tokens replaced by
their vectors' ids) is cut into chunks of 75 tokens; each chunk is encoded on its own as BOS + 75 + EOS
(+ padding: the layout of `CLIPTokenizer.__call__`) and the chunk encodings are concatenated along the
sequence. `BREAK` closes a chunk early; a textual-inversion token's vectors never straddle two chunks.
All prompts of one call (and their negatives) are padded with empty-prompt chunks to one chunk count.
A prompt of at most 75 tokens without emphasis is one chunk with exactly the ids the tokenizer gives, so
its embeddings are bitwise those of `text_encoder(tokenizer(prompts))`.

Emphasis ("original", A1111's default): each token's output embedding is multiplied by its weight, then the
chunk is rescaled so that its mean (over tokens and channels) is what it was before. A1111 takes that mean
over the whole batch of one chunk; sdrt takes it per prompt, so a prompt's embeddings do not depend on the
other prompts of the call. "no_norm" multiplies without rescaling; "none" reads brackets as plain text.

Without chunking (`prompt_chunking=False`) the token stream is cut after 75 tokens (what the plain
tokenizer does), with the same warning; BREAK is then only a separator.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import torch

from sdrt.errors import InvalidInputError
from sdrt.prompt_parser import Break, parse_prompt, plain_prompt
from sdrt.tokenizer import CLIPTokenizer

log = logging.getLogger(__name__)

EMPHASIS = ("original", "no_norm", "none")
CHUNK_TOKENS = 75  # CLIP's 77 positions less BOS and EOS
MAX_CHUNKS = 8  # 600 tokens: beyond this a prompt is refused rather than silently costing 8x per step


@dataclass(frozen=True)
class PromptOptions:
    """How prompt text becomes embeddings (the pipeline's `prompt_chunking`, `emphasis` and `clip_skip`)."""
    chunking: bool = True
    emphasis: str = "original"
    clip_skip: int = 0  # diffusers' clip_skip: use the hidden state this many layers before the last


def surely_one_chunk(text: str) -> bool:
    """True when `text` is certainly one chunk, without a tokenizer: a token covers at least one UTF-8 byte
    of non-space text, so 75 such bytes and no BREAK are at most 75 tokens (textual-inversion tokens aside)."""
    return "BREAK" not in text and len("".join(text.split()).encode("utf-8", "replace")) <= CHUNK_TOKENS


def check_prompt_options(prompt_chunking, emphasis, clip_skip, num_layers: int) -> PromptOptions:
    if not isinstance(prompt_chunking, bool):
        raise InvalidInputError(f"prompt_chunking must be True or False, got {prompt_chunking!r}")
    if emphasis not in EMPHASIS:
        raise InvalidInputError(f"emphasis must be one of {', '.join(EMPHASIS)}, got {emphasis!r}")
    skip = 0 if clip_skip is None else clip_skip
    if isinstance(skip, bool) or not isinstance(skip, int) or not 0 <= skip < num_layers:
        raise InvalidInputError(f"clip_skip must be None or an integer in [0, {num_layers - 1}] (this text encoder "
                                f"has {num_layers} layers), got {clip_skip!r}")
    return PromptOptions(prompt_chunking, emphasis, skip)


@dataclass
class Chunk:
    ids: list[int]        # model_max_length ids: BOS, tokens, EOS, padding
    weights: list[float]  # one per id; 1.0 on BOS, EOS and padding


class ChunkBuilder:
    """One prompt's token groups -> chunks. A group (one token, or all vectors of one embedding) is never split."""

    def __init__(self, tokenizer: CLIPTokenizer):
        self.tokenizer = tokenizer
        self.length = tokenizer.model_max_length - 2  # 75 for CLIP
        self.chunks: list[Chunk] = []
        self.ids: list[int] = []
        self.weights: list[float] = []

    def add(self, group: Sequence[int], weight: float) -> None:
        if len(self.ids) + len(group) > self.length:
            self.close()
        self.ids += group
        self.weights += [weight] * len(group)

    def close(self) -> None:
        self.chunks.append(make_chunk(self.tokenizer, self.ids, self.weights))
        self.ids, self.weights = [], []

    def finish(self) -> list[Chunk]:
        if self.ids or not self.chunks:
            self.close()
        return self.chunks


def make_chunk(tokenizer: CLIPTokenizer, ids: Sequence[int], weights: Sequence[float]) -> Chunk:
    pad = tokenizer.model_max_length - 2 - len(ids)
    return Chunk([tokenizer.bos_token_id, *ids, tokenizer.eos_token_id] + [tokenizer.pad_token_id] * pad,
                 [1.0, *weights, 1.0] + [1.0] * pad)


def prompt_groups(text: str, tokenizer: CLIPTokenizer, options: PromptOptions,
                  embeddings: Mapping[str, Sequence[int]]) -> list:
    """[(group of ids, weight) | Break]: every token its own group, an embedding's ids one group. Each
    fragment is tokenized on its own (A1111 does the same), as is the text between embedding tokens."""
    parts = plain_prompt(text) if options.emphasis == "none" else parse_prompt(text)
    split = re.compile("(" + "|".join(map(re.escape, sorted(embeddings, key=len, reverse=True))) + ")") \
        if embeddings else None
    groups: list = []
    for part in parts:
        if isinstance(part, Break):
            groups.append(part)
            continue
        pieces = [part.text] if split is None else split.split(part.text)
        for i, piece in enumerate(pieces):
            if i % 2:  # a captured embedding token
                groups.append((list(embeddings[piece]), part.weight))
            elif piece:
                groups += [([t], part.weight) for t in tokenizer.token_ids([piece])[0]]
    return groups


def prompt_chunks(text: str, tokenizer: CLIPTokenizer, options: PromptOptions,
                  embeddings: Mapping[str, Sequence[int]], index: int = 0) -> list[Chunk]:
    builder = ChunkBuilder(tokenizer)
    groups = prompt_groups(text, tokenizer, options, embeddings)
    if not options.chunking:
        return [_truncated(builder, [g for g in groups if not isinstance(g, Break)], index)]
    for group in groups:
        if isinstance(group, Break):
            builder.close()
        else:
            builder.add(*group)
    chunks = builder.finish()
    if len(chunks) > MAX_CHUNKS:
        raise InvalidInputError(f"prompt {index} needs {len(chunks)} chunks of {builder.length} tokens; at most "
                                f"{MAX_CHUNKS} are taken ({MAX_CHUNKS * builder.length} tokens)")
    return chunks


def _truncated(builder: ChunkBuilder, groups: list, index: int) -> Chunk:
    total = sum(len(g) for g, _ in groups)
    for group, weight in groups:
        if len(builder.ids) + len(group) > builder.length:
            break
        builder.add(group, weight)
    if total > len(builder.ids):
        n = builder.length + 2
        log.warning("prompt %d is %d tokens long with BOS/EOS; the text encoder takes %d, so its last %d tokens "
                    "are dropped", index, total + 2, n, total - len(builder.ids))
    return builder.finish()[0]


def chunk_tensors(tokenizer: CLIPTokenizer, prompts: list[list[Chunk]],
                  n_chunks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each prompt's chunks, padded with empty chunks to n_chunks -> (ids, weights), both [B, n_chunks, 77]."""
    empty = make_chunk(tokenizer, [], [])
    padded = [chunks + [empty] * (n_chunks - len(chunks)) for chunks in prompts]
    return (torch.tensor([[c.ids for c in chunks] for chunks in padded], dtype=torch.long),
            torch.tensor([[c.weights for c in chunks] for chunks in padded]))


def weighted(z: torch.Tensor, weights: torch.Tensor, options: PromptOptions) -> torch.Tensor:
    """z [N, 77, D] chunk encodings with their weights [N, 77] applied per `options.emphasis`."""
    if options.emphasis == "none" or not bool((weights != 1).any()):
        return z
    return apply_weights(z, weights.to(z.device), normalize=options.emphasis == "original")


def encode_chunks(text_encoder, tokenizer: CLIPTokenizer, prompts: list[list[Chunk]], n_chunks: int,
                  options: PromptOptions, device: torch.device) -> torch.Tensor:
    """Each prompt's chunks, padded with empty chunks to n_chunks -> [B, n_chunks * 77, D]."""
    ids, weights = chunk_tensors(tokenizer, prompts, n_chunks)
    b, k, n = ids.shape
    flat = ids.view(b * k, n).to(device)
    z = text_encoder(flat) if not options.clip_skip else text_encoder(flat, clip_skip=options.clip_skip)
    z = weighted(z, weights.view(b * k, n), options)
    return z.reshape(b, k * n, z.shape[-1])


def apply_weights(z: torch.Tensor, weights: torch.Tensor, normalize: bool) -> torch.Tensor:
    """z: [N, 77, D] chunk encodings; weights: [N, 77]. Scale each token, then (normalize) restore each chunk's
    mean; computed in float32."""
    z32 = z.float()
    scaled = z32 * weights[..., None]
    if normalize:
        before, after = z32.mean(dim=(1, 2), keepdim=True), scaled.mean(dim=(1, 2), keepdim=True)
        scaled = scaled * torch.where(after != 0, before / after, torch.ones_like(after))
    return scaled.to(z.dtype)


def encode_prompt_pair(text_encoder, tokenizer: CLIPTokenizer, prompts: Optional[list[str]],
                       negatives: Optional[list[str]], options: PromptOptions,
                       embeddings: Mapping[str, Sequence[int]], device: torch.device,
                       min_chunks: int = 1) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(cond [B, 77k, D] or None, uncond [B, 77k, D] or None), both with one chunk count k, at least min_chunks."""
    cond = None if prompts is None else [prompt_chunks(t, tokenizer, options, embeddings, i)
                                         for i, t in enumerate(prompts)]
    uncond = None if negatives is None else [prompt_chunks(t, tokenizer, options, embeddings, i)
                                             for i, t in enumerate(negatives)]
    k = max([min_chunks] + [len(c) for c in (cond or []) + (uncond or [])])
    return tuple(None if p is None else encode_chunks(text_encoder, tokenizer, p, k, options, device)
                 for p in (cond, uncond))

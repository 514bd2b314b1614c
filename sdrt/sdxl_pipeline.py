"""SDXL base and refiner: the SD pipeline's call with SDXL's text encoding and micro-conditioning.

Text: each encoder's penultimate hidden states, concatenated (the refiner has only the second encoder); the
second encoder's projected pooled output is the U-Net's `text_embeds`. Without a negative prompt under CFG a
model with force_zeros_for_empty_prompt (the base) uses zero negative embeddings, as diffusers does.
Size/crop/aesthetic ids: see `sdrt.sdxl_conditioning`. Unset strength: diffusers' SDXL defaults (img2img 0.3,
inpainting 0.9999).
Base -> refiner handoff: denoising_end / denoising_start (see `sdrt.sdxl_handoff`); the refiner takes the base's
result.latents as image=.
Prompts: long-prompt chunks, `(word:1.3)` emphasis, clip_skip and textual inversion (SDXL's clip_l + clip_g
files) through both encoders, see `sdrt.sdxl_prompts`; a prompt of at most 75 tokens without emphasis is
encoded as diffusers' SDXL pipelines encode it.
"""
from __future__ import annotations

from contextvars import ContextVar
from typing import Any, Optional

import torch

from sdrt.components import Components
from sdrt.control import SDXL_DEFAULT_SCALES
from sdrt.errors import InvalidInputError
from sdrt.pipeline import (GenerationResult, Pipeline, _check_path, _check_tensor, _text_list, min_chunk_count,
                           negative_texts)
from sdrt.models.clip import CLIPTextModel
from sdrt.prompt_encoding import PromptOptions, check_prompt_options
from sdrt.sdxl_components import SDXLComponents
from sdrt.sdxl_conditioning import SDXLOptions, batched, check_pair, check_score, time_ids
from sdrt.sdxl_handoff import check_fraction, handoff_range
from sdrt.sdxl_prompts import SDXLEncoder, encode_sdxl_pair
from sdrt.textual_inversion import load_sdxl_textual_inversion

SDXL_BACKENDS = ("torch", "triton", "onnxruntime", "openvino")
IMG2IMG_STRENGTH, INPAINT_STRENGTH = 0.3, 0.9999

# the SDXL arguments of the call in progress (a ContextVar: concurrent calls in threads each see their own)
_OPTIONS: ContextVar[SDXLOptions] = ContextVar("sdxl_options")


def pipeline_class(components: Components, backend: str) -> type:
    """The pipeline class for these components; SDXL's refuses what it does not support yet."""
    if not isinstance(components, SDXLComponents):
        return Pipeline
    if backend not in SDXL_BACKENDS:
        raise InvalidInputError(f"SDXL runs on the {', '.join(SDXL_BACKENDS)} backend so far, got backend={backend!r}")
    return SDXLPipeline


class SDXLPipeline(Pipeline):
    """An SDXL base or refiner; call it as `Pipeline`, with SDXL's extra keyword arguments."""

    honours_force_upcast = True  # as diffusers' SDXL pipelines (see sdrt.vae_precision)

    def __init__(self, components: SDXLComponents, **kwargs):
        super().__init__(components, **kwargs)
        self.tokenizer_2, self.text_encoder_2 = components.tokenizer_2, components.text_encoder_2
        self.force_zeros_for_empty_prompt = components.force_zeros_for_empty_prompt
        self.requires_aesthetics_score = components.requires_aesthetics_score
        self.control_scale_defaults = SDXL_DEFAULT_SCALES
        self.embedding_tokens_2: dict[str, list[int]] = {}  # textual inversion: token -> its ids in encoder 2

    def __call__(self, prompt=None, negative_prompt=None, *, original_size: Optional[tuple] = None,
                 crops_coords_top_left: tuple = (0, 0), target_size: Optional[tuple] = None,
                 negative_original_size: Optional[tuple] = None, negative_crops_coords_top_left: tuple = (0, 0),
                 negative_target_size: Optional[tuple] = None, aesthetic_score: float = 6.0,
                 negative_aesthetic_score: float = 2.5, pooled_prompt_embeds: Optional[torch.Tensor] = None,
                 negative_pooled_prompt_embeds: Optional[torch.Tensor] = None, denoising_start: Optional[float] = None,
                 denoising_end: Optional[float] = None, **kwargs: Any) -> GenerationResult:
        """`Pipeline.__call__`'s arguments plus SDXL's: sizes as (height, width), crops as (top, left);
        original_size/target_size default to the output size. The refiner conditions on aesthetic_score and
        negative_aesthetic_score instead of target sizes. With prompt_embeds ([B, 77, 2048] for the base) pass
        pooled_prompt_embeds [B, projection_dim] too (and the negative pair together, likewise).
        denoising_end / denoising_start in (0, 1): run only the schedule's part before / after that fraction
        (`sdrt.sdxl_handoff`), e.g. base(..., denoising_end=0.8, output="latent") then
        refiner(..., image=base_result.latents, denoising_start=0.8); denoising_start needs image= and
        ignores strength."""
        for name, value in (("pooled_prompt_embeds", pooled_prompt_embeds),
                            ("negative_pooled_prompt_embeds", negative_pooled_prompt_embeds)):
            if value is not None:
                if not torch.is_tensor(value):
                    raise InvalidInputError(f"{name} must be a tensor, got {type(value).__name__}")
                _check_tensor(name, value)
        options = SDXLOptions(
            check_pair("original_size", original_size, positive=True),
            check_pair("crops_coords_top_left", crops_coords_top_left, positive=False),
            check_pair("target_size", target_size, positive=True),
            check_pair("negative_original_size", negative_original_size, positive=True),
            check_pair("negative_crops_coords_top_left", negative_crops_coords_top_left, positive=False),
            check_pair("negative_target_size", negative_target_size, positive=True),
            check_score("aesthetic_score", aesthetic_score), check_score("negative_aesthetic_score",
                                                                         negative_aesthetic_score),
            pooled_prompt_embeds, negative_pooled_prompt_embeds, check_fraction("denoising_start", denoising_start),
            check_fraction("denoising_end", denoising_end))
        if options.denoising_start is not None:
            if kwargs.get("image") is None:
                raise InvalidInputError("denoising_start needs image= (the latents or picture to continue from)")
            if kwargs.get("latents") is not None and kwargs.get("mask") is None:
                raise InvalidInputError("latents (the start noise) cannot be combined with denoising_start: the "
                                        "image's latents are the start as they are")
        if kwargs.get("strength") is None and kwargs.get("image") is not None:
            kwargs["strength"] = self.default_strength(kwargs.get("mask") is not None)
        token = _OPTIONS.set(options)
        try:
            return super().__call__(prompt, negative_prompt, **kwargs)
        finally:
            _OPTIONS.reset(token)

    def _encoders(self) -> list[SDXLEncoder]:
        first = [] if self.text_encoder is None else [SDXLEncoder(self.text_encoder, self.tokenizer,
                                                                   self.embedding_tokens)]
        return first + [SDXLEncoder(self.text_encoder_2, self.tokenizer_2, self.embedding_tokens_2)]

    def _encode_text(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (context [B, 77k, D1 + D2]: both encoders' penultimate states, text_embeds [B, projection_dim])."""
        return encode_sdxl_pair(self._encoders(), texts, None, PromptOptions(), self.device)[0]

    def default_strength(self, inpainting: bool) -> float:
        return INPAINT_STRENGTH if inpainting else IMG2IMG_STRENGTH

    def _timesteps(self, sched, steps: int, strength: float, image_mode: bool):
        options = _OPTIONS.get()
        if options.denoising_start is None and options.denoising_end is None:
            return super()._timesteps(sched, steps, strength, image_mode)
        if options.denoising_start is None:
            schedule, start, _ = super()._timesteps(sched, steps, strength, image_mode)
        else:  # strength is ignored: the full schedule, entered at denoising_start
            schedule, start = sched.set_timesteps(steps, device=self.device), 0
        schedule, start = handoff_range(sched, schedule, start, options.denoising_start, options.denoising_end)
        return schedule, start, options.denoising_start is None

    def load_textual_inversion(self, path, token: Optional[str] = None) -> str:
        """Load an SDXL embedding file (clip_l + clip_g vectors; see `sdrt.textual_inversion`) into both text
        encoders (the refiner: clip_g into its one) so prompts can use its token; returns the token (default:
        the file's stem). Torch backend only."""
        _check_path("path", path)
        encoders = [("clip_l", self.text_encoder, self.embedding_tokens)] if self.text_encoder is not None else []
        encoders.append(("clip_g", self.text_encoder_2, self.embedding_tokens_2))
        return load_sdxl_textual_inversion(encoders, path, token, self.backend)

    def _prompt_options(self, clip_skip, prompt_chunking, emphasis) -> PromptOptions:
        encoders = [e.text_encoder for e in self._encoders()]
        modules = all(isinstance(e, CLIPTextModel) for e in encoders)
        if clip_skip not in (None, 0) and not modules:
            raise InvalidInputError(f"clip_skip needs the torch backend (the {self.backend} backend's text encoders "
                                    f"return only SDXL's penultimate layer)")
        layers = min(e.config.num_hidden_layers for e in encoders) if modules else 1
        return check_prompt_options(prompt_chunking, emphasis, clip_skip, layers)

    def _conditioning(self, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, n_prompts: int,
                      num_images: int, cfg: bool, prompt_options: PromptOptions, size: tuple[int, int],
                      image_mode: bool):
        options = _OPTIONS.get()
        texts = _text_list("prompt", prompt) if prompt_embeds is None else None
        zero_negatives = cfg and negative_prompt_embeds is None and negative_prompt is None \
            and self.force_zeros_for_empty_prompt
        negatives = negative_texts(negative_prompt, n_prompts) \
            if cfg and negative_prompt_embeds is None and not zero_negatives else None
        min_chunks = min_chunk_count(prompt_embeds, self.tokenizer_2)
        encoded, encoded_negatives = encode_sdxl_pair(self._encoders(), texts, negatives, prompt_options, self.device,
                                                      min_chunks)
        if encoded is not None:
            cond, pooled = encoded
        else:
            cond, pooled = prompt_embeds, self._given_pooled("pooled_prompt_embeds", options.pooled_prompt_embeds,
                                                             n_prompts)
        ids, neg_ids = time_ids(options, size, self.requires_aesthetics_score, image_mode)
        ids_row = torch.tensor([ids], dtype=self.dtype, device=self.device).expand(n_prompts, -1)
        rows = [(cond, pooled, ids_row)]
        if cfg:
            neg_row = torch.tensor([neg_ids], dtype=self.dtype, device=self.device).expand(n_prompts, -1)
            uncond, neg_pooled = self._negatives(negative_prompt_embeds, encoded_negatives, options, cond, pooled,
                                                 n_prompts)
            rows.insert(0, (uncond, neg_pooled, neg_row))
        context, text_embeds, added_ids = (batched([r[i].to(self.device, self.dtype) for r in rows], num_images)
                                           for i in range(3))
        return context, {"text_embeds": text_embeds, "time_ids": added_ids}

    def _negatives(self, negative_prompt_embeds, encoded_negatives, options: SDXLOptions, cond: torch.Tensor,
                   pooled: torch.Tensor, n_prompts: int) -> tuple[torch.Tensor, torch.Tensor]:
        if negative_prompt_embeds is not None:
            if negative_prompt_embeds.shape != cond.shape:
                raise InvalidInputError(f"negative_prompt_embeds must be a tensor of prompt_embeds' shape "
                                        f"{list(cond.shape)}")
            return negative_prompt_embeds, self._given_pooled("negative_pooled_prompt_embeds",
                                                              options.negative_pooled_prompt_embeds, n_prompts)
        if encoded_negatives is None:  # force_zeros_for_empty_prompt without a negative prompt
            return torch.zeros_like(cond), torch.zeros_like(pooled)
        uncond, neg_pooled = encoded_negatives
        if uncond.shape[1:] != cond.shape[1:]:
            raise InvalidInputError(f"prompt_embeds have shape {list(cond.shape[1:])} per prompt but the negative "
                                    f"prompt encodes to {list(uncond.shape[1:])}: pass negative_prompt_embeds")
        return uncond, neg_pooled

    def _given_pooled(self, name: str, value: Optional[torch.Tensor], n_prompts: int) -> torch.Tensor:
        width = self.text_encoder_2.config.projection_dim
        if value is None or tuple(value.shape) != (n_prompts, width):
            got = "nothing" if value is None else list(value.shape)
            raise InvalidInputError(f"{name} must be a tensor [{n_prompts}, {width}] beside the embeds, got {got}")
        return value


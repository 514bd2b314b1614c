"""The prompt inputs of a benchmark's pipeline call, from token ids, for sdrt and for diffusers: the [uncond; cond]
ids through each library's own text encoder(s) -> the keyword arguments its pipeline takes. Both libraries get
the same ids (the bench models' byte tokenizer is not CLIP's, so neither tokenizes).

SD: prompt_embeds / negative_prompt_embeds, the last hidden state. SDXL: both encoders' penultimate hidden
states concatenated, plus the second encoder's projected pooled output as pooled_prompt_embeds /
negative_pooled_prompt_embeds (what diffusers' StableDiffusionXLPipeline.encode_prompt computes)."""
from __future__ import annotations

import torch


def sdrt_prompt_inputs(pipe, ids: torch.Tensor, batch: int) -> dict[str, torch.Tensor]:
    """ids: [2 * batch, 77], [uncond; cond] -> sdrt Pipeline.__call__ keyword arguments."""
    if getattr(pipe, "text_encoder_2", None) is None:
        return _pair("prompt_embeds", pipe.text_encoder(ids), batch)
    second, pooled = pipe.text_encoder_2.sdxl_states(ids)
    context = torch.cat([pipe.text_encoder.penultimate(ids)[0], second], dim=-1)
    return {**_pair("prompt_embeds", context, batch), **_pair("pooled_prompt_embeds", pooled, batch)}


def diffusers_prompt_inputs(pipe, ids: torch.Tensor, batch: int) -> dict[str, torch.Tensor]:
    """ids: [2 * batch, 77], [uncond; cond] -> diffusers pipeline __call__ keyword arguments."""
    if getattr(pipe, "text_encoder_2", None) is None:
        return _pair("prompt_embeds", pipe.text_encoder(ids)[0], batch)
    first = pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
    out = pipe.text_encoder_2(ids, output_hidden_states=True)
    context = torch.cat([first, out.hidden_states[-2]], dim=-1)
    return {**_pair("prompt_embeds", context, batch), **_pair("pooled_prompt_embeds", out.text_embeds, batch)}


def _pair(name: str, both: torch.Tensor, batch: int) -> dict[str, torch.Tensor]:
    return {name: both[batch:], f"negative_{name}": both[:batch]}

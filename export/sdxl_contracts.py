"""Export contracts of an SDXL base or refiner: the VAE's as for SD1, and

    text_encoder    input_ids [B, 77] -> penultimate_hidden_state [B, 77, D1]   (absent in the refiner)
    text_encoder_2  input_ids [B, 77] -> penultimate_hidden_state [B, 77, D2], text_embeds [B, projection_dim]
    unet            sample, timestep, encoder_hidden_states [B, 77*k, D1+D2], text_embeds [B, P], time_ids [B, n]
                    -> noise_pred

the reading SDXL's pipeline makes of each module (penultimate layer without the final norm; the second
encoder's projected pooled output), so the graphs hold exactly what the pipeline calls.
"""
from __future__ import annotations

import torch
from torch import nn

from sdrt.components import Components
from sdrt.export.contracts import TEXT_LENGTH, ExportContract, ShapeProfile

# SDXL's TensorRT profile around its native side (1024): 768..1344 (the SDXL resolution buckets' span), batch 1-4
SDXL_PROFILE_SPAN = (0.75, 1.0, 1.3125)
SDXL_PROFILE_BATCH = (1, 2, 4)
SDXL_TEXT_OUTPUTS = ("penultimate_hidden_state",)
SDXL_TEXT_2_OUTPUTS = ("penultimate_hidden_state", "text_embeds")


class _Penultimate(nn.Module):
    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.encoder.penultimate(input_ids)[0]


class _PenultimateAndTextEmbeds(_Penultimate):
    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encoder.sdxl_states(input_ids)


class _ConditionedUNet(nn.Module):
    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids) -> torch.Tensor:
        return self.unet(sample, timestep, encoder_hidden_states, text_embeds=text_embeds, time_ids=time_ids)


def _text_contract(name: str, module, outputs: tuple[str, ...], hidden: int, projection: int, vocab: int):
    widths = {"penultimate_hidden_state": (TEXT_LENGTH, hidden), "text_embeds": (projection,)}
    return ExportContract(
        name, ("input_ids",), outputs, {n: {0: "batch"} for n in ("input_ids",) + outputs}, module,
        lambda b, h, w, n=TEXT_LENGTH: {"input_ids": (b, TEXT_LENGTH)},
        lambda s: {o: (s["input_ids"][0], *widths[o]) for o in outputs},
        {"input_ids": torch.int64}, {"input_ids": vocab})


def sdxl_contracts(components: Components, sd_contracts: dict[str, ExportContract]) -> dict[str, ExportContract]:
    """SDXL's contracts; `sd_contracts` are the SD ones for the same components (their VAE contracts are kept)."""
    ucfg, t2cfg = components.unet.config, components.text_encoder_2.config
    n_ids = (ucfg.projection_class_embeddings_input_dim - t2cfg.projection_dim) // ucfg.addition_time_embed_dim
    base = sd_contracts["unet"]

    def unet_inputs(b, h, w, n=TEXT_LENGTH):
        return {**base.input_shapes(b, h, w, n), "text_embeds": (b, t2cfg.projection_dim), "time_ids": (b, n_ids)}

    contracts = {}
    if components.text_encoder is not None:
        tcfg = components.text_encoder.config
        contracts["text_encoder"] = _text_contract("text_encoder", lambda c: _Penultimate(c.text_encoder),
                                                   SDXL_TEXT_OUTPUTS, tcfg.hidden_size, 0, tcfg.vocab_size)
    contracts["text_encoder_2"] = _text_contract(
        "text_encoder_2", lambda c: _PenultimateAndTextEmbeds(c.text_encoder_2), SDXL_TEXT_2_OUTPUTS,
        t2cfg.hidden_size, t2cfg.projection_dim, t2cfg.vocab_size)
    contracts["unet"] = ExportContract(
        "unet", base.input_names + ("text_embeds", "time_ids"), base.output_names,
        {**base.dynamic_axes, "text_embeds": {0: "batch"}, "time_ids": {0: "batch"}},
        lambda c: _ConditionedUNet(c.unet), unet_inputs, base.output_shapes, base.fixed_input_dtypes)
    return {**contracts, "vae_encoder": sd_contracts["vae_encoder"], "vae_decoder": sd_contracts["vae_decoder"]}


def sdxl_profile(native_side: int, vae_scale: int) -> ShapeProfile:
    """The default TensorRT profile of an SDXL model: sides SDXL_PROFILE_SPAN times the native one (1024 ->
    768, 1024, 1344), rounded to the VAE's multiple; batch SDXL_PROFILE_BATCH (CFG doubles it)."""
    sides = tuple(max(vae_scale, round(native_side * f / vae_scale) * vae_scale) for f in SDXL_PROFILE_SPAN)
    return ShapeProfile(batch=SDXL_PROFILE_BATCH, height=sides, width=sides)

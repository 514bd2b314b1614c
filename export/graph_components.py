"""Text encoder, U-Net and VAE objects with the reference call semantics around exported graphs.

A runner is any callable taking the contract's inputs as keyword torch tensors and returning the
outputs as a list (an ONNX Runtime session, a TensorRT engine). Configs come from the torch modules.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Union

import torch

from sdrt.components import Components

Runner = Callable[..., list[torch.Tensor]]


class GraphTextEncoder:
    def __init__(self, runner: Runner, config, module: Optional[torch.nn.Module] = None):
        # module: the torch module the graph was exported from, kept so its weights can change (LoRA)
        self.runner, self.config, self.module = runner, config, module

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.runner(input_ids=input_ids)[0]


class GraphSDXLTextEncoder(GraphTextEncoder):
    """SDXL's first encoder: the graph gives the penultimate hidden states (`CLIPTextModel.penultimate`)."""

    def penultimate(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, None]:
        return self.runner(input_ids=input_ids)[0], None


class GraphSDXLTextEncoder2(GraphTextEncoder):
    """SDXL's second encoder: the graph gives (penultimate hidden states, text_embeds), `sdxl_states`' pair."""

    def sdxl_states(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        penultimate, text_embeds = self.runner(input_ids=input_ids)
        return penultimate, text_embeds


class GraphUNet:
    def __init__(self, runner: Runner, config, module: Optional[torch.nn.Module] = None):
        # module: the torch module the graph was exported from, kept so its weights can change (LoRA)
        self.runner, self.config, self.module = runner, config, module

    def __call__(self, sample: torch.Tensor, timestep: Union[torch.Tensor, float, int],
                 context: torch.Tensor, **added: torch.Tensor) -> torch.Tensor:
        # the graph takes one float32 timestep per batch item; added: SDXL's text_embeds and time_ids
        timesteps = torch.as_tensor(timestep, dtype=torch.float32, device=sample.device).reshape(-1)
        return self.runner(sample=sample, timestep=timesteps.expand(sample.shape[0]),
                           encoder_hidden_states=context, **added)[0]


class GraphVAE:
    def __init__(self, encoder: Runner, decoder: Runner, config):
        self.encoder, self.decoder, self.config = encoder, decoder, config

    @property
    def scaling_factor(self) -> float:
        return self.config.scaling_factor

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, logvar = self.encoder(images=images)
        return mean, logvar

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decoder(latents=latents)[0]


def graph_components(components: Components, runners: dict[str, Runner], keep_modules: bool = True) -> Components:
    """`components` with the models replaced by `runners` (keyed by contract name); tokenizers, flags kept.
    keep_modules: keep the torch modules (their weights: for LoRA); False frees them, for runners that cannot
    take new weights anyway."""
    def module(m):
        return m if keep_modules else None

    unet = GraphUNet(runners["unet"], components.unet.config, module(components.unet))
    vae = GraphVAE(runners["vae_encoder"], runners["vae_decoder"], components.vae.config)
    if getattr(components, "text_encoder_2", None) is None:
        return Components(components.tokenizer,
                          GraphTextEncoder(runners["text_encoder"], components.text_encoder.config,
                                           module(components.text_encoder)),
                          unet, vae, components.scheduler_config, components.source)
    first = components.text_encoder
    return dataclasses.replace(
        components, unet=unet, vae=vae,
        text_encoder=None if first is None else GraphSDXLTextEncoder(runners["text_encoder"], first.config,
                                                                     module(first)),
        text_encoder_2=GraphSDXLTextEncoder2(runners["text_encoder_2"], components.text_encoder_2.config,
                                             module(components.text_encoder_2)))

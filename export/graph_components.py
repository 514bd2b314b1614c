"""Text encoder, U-Net and VAE objects with the reference call semantics around exported graphs.

A runner is any callable taking the contract's inputs as keyword torch tensors and returning the
outputs as a list (an ONNX Runtime session, a TensorRT engine). Configs come from the torch modules.
"""
from __future__ import annotations

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


class GraphUNet:
    def __init__(self, runner: Runner, config, module: Optional[torch.nn.Module] = None):
        # module: the torch module the graph was exported from, kept so its weights can change (LoRA)
        self.runner, self.config, self.module = runner, config, module

    def __call__(self, sample: torch.Tensor, timestep: Union[torch.Tensor, float, int],
                 context: torch.Tensor) -> torch.Tensor:
        # the graph takes one float32 timestep per batch item
        timesteps = torch.as_tensor(timestep, dtype=torch.float32, device=sample.device).reshape(-1)
        return self.runner(sample=sample, timestep=timesteps.expand(sample.shape[0]),
                           encoder_hidden_states=context)[0]


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


def graph_components(components: Components, runners: dict[str, Runner]) -> Components:
    """`components` with the models replaced by `runners` (keyed by contract name); tokenizer kept."""
    return Components(components.tokenizer,
                      GraphTextEncoder(runners["text_encoder"], components.text_encoder.config, components.text_encoder),
                      GraphUNet(runners["unet"], components.unet.config, components.unet),
                      GraphVAE(runners["vae_encoder"], runners["vae_decoder"], components.vae.config),
                      components.scheduler_config, components.source)

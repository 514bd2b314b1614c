"""One small export contract per component: the module to trace, input/output names, dynamic axes,
sample inputs, output shapes and TensorRT shape profiles.

Sizes in a `ShapeProfile` are image pixels; each contract converts them to its own tensors' sizes
(latents are the VAE's `downsample_factor` times smaller than images).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from sdrt.components import Components
from sdrt.errors import InvalidInputError

COMPONENTS = ("text_encoder", "unet", "vae_encoder", "vae_decoder")
ALL_COMPONENTS = COMPONENTS + ("text_encoder_2",)  # SDXL's second text encoder (see sdrt.export.sdxl_contracts)
TEXT_LENGTH = 77  # CLIP's 77 positions: the text encoder's input; the U-Net's context is 77 * chunks long

Shape = tuple[int, ...]


@dataclass(frozen=True)
class ShapeProfile:
    """(min, opt, max) of batch, image height, image width and the U-Net's context length (77 per 75-token
    prompt chunk: 77..231 covers prompts of up to 3 chunks); min == opt == max everywhere is static."""
    batch: tuple[int, int, int] = (1, 1, 4)
    height: tuple[int, int, int] = (256, 512, 1024)
    width: tuple[int, int, int] = (256, 512, 1024)
    text_length: tuple[int, int, int] = (TEXT_LENGTH, TEXT_LENGTH, 3 * TEXT_LENGTH)

    @classmethod
    def static(cls, batch: int, height: int, width: int, text_length: int = TEXT_LENGTH) -> "ShapeProfile":
        return cls((batch,) * 3, (height,) * 3, (width,) * 3, (text_length,) * 3)

    @property
    def is_static(self) -> bool:
        return all(lo == hi for lo, _, hi in (self.batch, self.height, self.width, self.text_length))

    def validate(self, vae_scale: int) -> None:
        for name, (lo, opt, hi) in (("batch", self.batch), ("height", self.height), ("width", self.width)):
            if not 1 <= lo <= opt <= hi:
                raise InvalidInputError(f"profile {name} must satisfy 1 <= min <= opt <= max, got {(lo, opt, hi)}")
        for name, sizes in (("height", self.height), ("width", self.width)):
            if any(s % vae_scale for s in sizes):
                raise InvalidInputError(f"profile {name} values must be multiples of {vae_scale}, got {sizes}")
        lo, opt, hi = self.text_length
        if not TEXT_LENGTH <= lo <= opt <= hi or any(n % TEXT_LENGTH for n in self.text_length):
            raise InvalidInputError(f"profile text_length must be multiples of {TEXT_LENGTH} with min <= opt <= max, "
                                    f"got {self.text_length}")

    def as_dict(self) -> dict:
        return {"batch": list(self.batch), "height": list(self.height), "width": list(self.width),
                "text_length": list(self.text_length)}


class _VAEEncoder(nn.Module):
    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.vae.encode(images)


class _VAEDecoder(nn.Module):
    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents)


@dataclass(frozen=True)
class ExportContract:
    name: str
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    dynamic_axes: dict[str, dict[int, str]]  # tensor name -> {axis: symbolic name}, inputs and outputs
    module: Callable[[Components], nn.Module]
    # (batch, image height, image width[, context length]) -> the shape of every input
    input_shapes: Callable[..., dict[str, Shape]]
    # input shapes -> output shapes
    output_shapes: Callable[[dict[str, Shape]], dict[str, Shape]]
    # float inputs follow the export dtype; these keep a fixed dtype
    fixed_input_dtypes: dict[str, torch.dtype]
    # integer inputs -> their exclusive upper bound (token ids must index this model's vocabulary)
    id_bounds: dict[str, int] = field(default_factory=dict)

    def sample_inputs(self, batch: int, height: int, width: int, dtype: torch.dtype,
                      device: torch.device | str = "cpu", seed: int = 0) -> dict[str, torch.Tensor]:
        gen = torch.Generator("cpu").manual_seed(seed)
        inputs = {}
        for name, shape in self.input_shapes(batch, height, width).items():
            fixed = self.fixed_input_dtypes.get(name)
            if fixed == torch.int64:
                value = torch.randint(0, self.id_bounds[name], shape, generator=gen)
            elif name == "timestep":
                value = torch.randint(0, 1000, shape, generator=gen).float()
            else:
                value = torch.randn(shape, generator=gen)
            inputs[name] = value.to(device=device, dtype=fixed or dtype)
        return inputs

    def input_dtype(self, name: str, dtype: torch.dtype) -> torch.dtype:
        return self.fixed_input_dtypes.get(name, dtype)

    def profile_shapes(self, profile: ShapeProfile) -> dict[str, tuple[Shape, Shape, Shape]]:
        """input name -> (min, opt, max) shapes for a TensorRT optimization profile."""
        lo, opt, hi = (self.input_shapes(profile.batch[i], profile.height[i], profile.width[i], profile.text_length[i])
                       for i in range(3))
        return {name: (lo[name], opt[name], hi[name]) for name in self.input_names}


def contracts_for(components: Components) -> dict[str, ExportContract]:
    """The four contracts, sized by this model's configs (SDXL: `sdxl_contracts`'s five, or four for the refiner)."""
    ucfg, vcfg = components.unet.config, components.vae.config
    scale = components.vae.config.downsample_factor
    lat = vcfg.latent_channels

    def text_inputs(b, h, w, n=TEXT_LENGTH):  # the text encoder takes one 77-token chunk per row
        return {"input_ids": (b, TEXT_LENGTH)}

    def unet_inputs(b, h, w, n=TEXT_LENGTH):
        return {"sample": (b, ucfg.in_channels, h // scale, w // scale), "timestep": (b,),
                "encoder_hidden_states": (b, n, ucfg.cross_attention_dim)}

    def encoder_inputs(b, h, w, n=TEXT_LENGTH):
        return {"images": (b, vcfg.in_channels, h, w)}

    def decoder_inputs(b, h, w, n=TEXT_LENGTH):
        return {"latents": (b, lat, h // scale, w // scale)}

    bhw = {0: "batch", 2: "height", 3: "width"}
    contracts = {
        "text_encoder": None if components.text_encoder is None else ExportContract(
            "text_encoder", ("input_ids",), ("last_hidden_state",),
            {"input_ids": {0: "batch"}, "last_hidden_state": {0: "batch"}},
            lambda c: c.text_encoder, text_inputs,
            lambda s: {"last_hidden_state": (s["input_ids"][0], TEXT_LENGTH, components.text_encoder.config.hidden_size)},
            {"input_ids": torch.int64}, {"input_ids": components.text_encoder.config.vocab_size}),
        "unet": ExportContract(
            "unet", ("sample", "timestep", "encoder_hidden_states"), ("noise_pred",),
            {"sample": bhw, "timestep": {0: "batch"}, "encoder_hidden_states": {0: "batch", 1: "text_length"},
             "noise_pred": bhw},
            lambda c: c.unet, unet_inputs,
            lambda s: {"noise_pred": (*s["sample"][:1], ucfg.out_channels, *s["sample"][2:])},
            {"timestep": torch.float32}),
        "vae_encoder": ExportContract(
            "vae_encoder", ("images",), ("mean", "logvar"),
            {"images": bhw, "mean": bhw, "logvar": bhw},
            lambda c: _VAEEncoder(c.vae), encoder_inputs,
            lambda s: dict.fromkeys(("mean", "logvar"), (s["images"][0], lat, s["images"][2] // scale,
                                                         s["images"][3] // scale)),
            {}),
        "vae_decoder": ExportContract(
            "vae_decoder", ("latents",), ("images",),
            {"latents": bhw, "images": bhw},
            lambda c: _VAEDecoder(c.vae), decoder_inputs,
            lambda s: {"images": (s["latents"][0], vcfg.out_channels, s["latents"][2] * scale, s["latents"][3] * scale)},
            {}),
    }
    if getattr(components, "text_encoder_2", None) is not None:
        from sdrt.export.sdxl_contracts import sdxl_contracts
        return sdxl_contracts(components, contracts)
    return contracts


def check_component_names(names, allowed: tuple[str, ...] = COMPONENTS) -> tuple[str, ...]:
    names = tuple(names)
    unknown = [n for n in names if n not in allowed]
    if unknown or not names:
        raise InvalidInputError(f"components must be a non-empty subset of {', '.join(allowed)}, got {names!r}")
    return names

"""The layers a LoRA may change, and every name LoRA files use for them.

A target is a Linear or Conv2d weight of the U-Net or the text encoder. Files name it in one of these
spellings, all resolved here to our module name (diffusers' / transformers' names, which ours follow):
- diffusers / PEFT: `unet.down_blocks.0.attentions.0.proj_in`, `text_encoder.text_model.encoder.layers.0.mlp.fc1`
- kohya / AUTOMATIC1111: the same with `_` for `.` under `lora_unet_` / `lora_te_`, or in the original
  LDM naming (`lora_unet_input_blocks_1_1_proj_in`), read through `sdrt.single_file`'s key table.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from torch import nn

from sdrt.single_file import _find_rule, unet_rules

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
TEXT_MODEL_PREFIX = "text_model."
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                  "lora_te2_": "text_encoder_2"}


@dataclass(frozen=True)
class Target:
    component: str          # "unet" | "text_encoder" | "text_encoder_2" (SDXL)
    module: str             # our module name inside the component, e.g. "down_blocks.0.resnets.0.conv1"
    weight: nn.Parameter    # the parameter a fused LoRA writes into, in place

    @property
    def name(self) -> str:
        return f"{self.component}.{self.module}"


class TargetTable:
    """Every LoRA-able layer of a U-Net and a text encoder, by each name files give it."""

    def __init__(self, unet: nn.Module, text_encoder: Optional[nn.Module], text_encoder_2: Optional[nn.Module] = None):
        self.modules: dict[str, dict[str, Target]] = {c: {} for c in COMPONENTS}
        self.kohya: dict[str, Target] = {}  # "lora_unet_down_blocks_0_..." -> target
        for component, root in (("unet", unet), ("text_encoder", text_encoder), ("text_encoder_2", text_encoder_2)):
            if root is None:  # SD 1/2 have no second text encoder; an SDXL refiner no first
                continue
            found = {name: Target(component, name, m.weight) for name, m in root.named_modules()
                     if isinstance(m, (nn.Linear, nn.Conv2d))}
            if component != "unet":  # transformers >= 5 names CLIPTextModel's layers without it
                found.update({n.removeprefix(TEXT_MODEL_PREFIX): t for n, t in list(found.items())})
            self.modules[component] = found
            for name, target in found.items():
                for prefix in (p for p, c in KOHYA_PREFIXES.items() if c == component):
                    self.kohya[prefix + _flat(name)] = target
        rules = unet_rules(unet.config)
        for name, target in self.modules["unet"].items():
            ldm = _ldm_name(rules, name)
            if ldm is not None:
                self.kohya.setdefault("lora_unet_" + _flat(ldm), target)

    def module(self, component: str, name: str) -> Union[Target, None]:
        return self.modules[component].get(name)

    def unique(self, component: str) -> list[Target]:
        """The component's targets, each once (the table also holds them under alias names)."""
        return list({t.name: t for t in self.modules[component].values()}.values())


def _flat(name: str) -> str:
    return name.replace(".", "_")


def _ldm_name(rules, name: str) -> Union[str, None]:
    """Our U-Net module name -> the original LDM one (`down_blocks.0.resnets.0.conv1` -> `input_blocks.1.0.in_layers.2`)."""
    rule = _find_rule(rules, name + ".weight")
    return None if rule is None else rule.source_key(name + ".weight")[: -len(".weight")]


def torch_module(component) -> nn.Module:
    """The torch module behind a pipeline component (the module itself, or a backend wrapper's `.module`)."""
    if isinstance(component, nn.Module):
        return component
    module = getattr(component, "module", None)
    if isinstance(module, nn.Module):
        return module
    raise TypeError(f"{type(component).__name__} holds no torch module")


"""LoRA adapters: file formats, the layers they target, and in-place fusing (see `sdrt.lora.api`)."""
from sdrt.lora.api import LoraMixin

__all__ = ["LoraMixin"]

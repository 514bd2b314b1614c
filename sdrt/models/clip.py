"""CLIP text encoder: token ids -> last hidden state after the final layer norm (and SDXL's readings:
the penultimate layer, the pooled end-of-text state, its projection).

One module covers SD 1.x (OpenAI ViT-L/14 text tower: quick_gelu, 12 layers, width 768) and SD 2.x
(OpenCLIP ViT-H text tower as diffusers stores it: gelu, 23 layers, width 1024). Parameter names are
transformers' `CLIPTextModel` checkpoint keys (the "text_model."-prefixed layout of SD checkpoints),
so those load with strict=True and no renaming beyond `checkpoint_state_dict`.
"""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from sdrt.config import CLIPTextConfig
from sdrt.errors import InvalidInputError

# Checkpoint entries that are not parameters of this module: older transformers versions saved the
# position-id buffer; the loader drops these keys before load_state_dict(strict=True).
IGNORED_KEYS = ("text_model.embeddings.position_ids", "embeddings.position_ids")
# transformers < 5 (every SD text_encoder/model.safetensors on the Hub) writes "text_model.embeddings...";
# transformers >= 5 saves CLIPTextModel without that prefix ("embeddings...").
KEY_PREFIX = "text_model."


def checkpoint_state_dict(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers CLIPTextModel checkpoint, in either key layout, -> this module's state dict."""
    return {(k if k.startswith(KEY_PREFIX) else KEY_PREFIX + k): v
            for k, v in tensors.items() if k not in IGNORED_KEYS}


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


_ACTIVATIONS = {"quick_gelu": _quick_gelu, "gelu": F.gelu}


class CLIPEmbeddings(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # input_ids: [B, L] -> [B, L, D]
        return self.token_embedding(input_ids) + self.position_embedding.weight[: input_ids.shape[1]]


class CLIPAttention(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        d = cfg.hidden_size
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, L, D]; heads: [B, H, L, D/H]
        b, n, d = x.shape
        q, k, v = (proj(x).view(b, n, self.num_heads, -1).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        # The causal mask has no place in sdrt.models.ops.attention (the fused-kernel dispatch point);
        # the text encoder runs once per prompt and is not a kernel target, so call SDPA directly.
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(y.transpose(1, 2).reshape(b, n, d))


class CLIPMLP(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.activation = _ACTIVATIONS[cfg.hidden_act]
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))

    def forward(self, x: torch.Tensor, clip_skip: int = 0) -> torch.Tensor:
        # clip_skip: leave out the last clip_skip layers (diffusers' clip_skip)
        for layer in self.layers[:len(self.layers) - clip_skip]:
            x = layer(x)
        return x


class CLIPTextTransformer(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.embeddings = CLIPEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, clip_skip: int = 0) -> torch.Tensor:
        return self.final_layer_norm(self.encoder(self.embeddings(input_ids), clip_skip))


class CLIPTextModel(nn.Module):
    """input_ids [B, L] (L <= max_position_embeddings, 77 for SD) -> last hidden state [B, L, hidden_size].
    clip_skip=N: the hidden state N layers before the last, through the final layer norm (diffusers' meaning;
    A1111's "clip skip 2" is N=1)."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        if cfg.hidden_act not in _ACTIVATIONS:
            raise InvalidInputError(f"hidden_act must be one of {', '.join(_ACTIVATIONS)}, got {cfg.hidden_act!r}")
        if cfg.hidden_size % cfg.num_attention_heads:
            raise InvalidInputError(f"hidden_size={cfg.hidden_size} must be divisible by "
                                    f"num_attention_heads={cfg.num_attention_heads}")
        self.config = cfg
        self.text_model = CLIPTextTransformer(cfg)

    def forward(self, input_ids: torch.Tensor, clip_skip: int = 0) -> torch.Tensor:
        if not 0 <= clip_skip < self.config.num_hidden_layers:
            raise InvalidInputError(f"clip_skip must be in [0, {self.config.num_hidden_layers - 1}], got {clip_skip}")
        return self.text_model(self._checked(input_ids), clip_skip)

    def _checked(self, input_ids: torch.Tensor) -> torch.Tensor:
        if input_ids.dim() != 2 or input_ids.shape[1] > self.config.max_position_embeddings:
            raise InvalidInputError(f"input_ids must have shape [B, L] with L <= "
                                    f"{self.config.max_position_embeddings}, got {tuple(input_ids.shape)}")
        return input_ids

    def penultimate(self, input_ids: torch.Tensor, clip_skip: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """SDXL's reading: (the second-to-last layer's output, no final norm [B, L, D]; the last hidden state).
        clip_skip=N reads the output 1 + N layers before the last instead (diffusers' SDXL clip_skip)."""
        model = self.text_model
        layers = model.encoder.layers
        if not 0 <= clip_skip < len(layers):
            raise InvalidInputError(f"clip_skip must be in [0, {len(layers) - 1}], got {clip_skip}")
        x = model.embeddings(self._checked(input_ids))
        for i, layer in enumerate(layers):
            if i == len(layers) - 1 - clip_skip:
                states = x
            x = layer(x)
        return states, model.final_layer_norm(x)

    def pooled(self, last_hidden: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """The last hidden state at each sequence's end-of-text token -> [B, D] (transformers' pooler_output)."""
        ids = input_ids.to(torch.int)
        eos = ids.argmax(-1) if self.config.eos_token_id == 2 else (ids == self.config.eos_token_id).int().argmax(-1)
        return last_hidden[torch.arange(last_hidden.shape[0], device=last_hidden.device), eos.to(last_hidden.device)]


class CLIPTextModelWithProjection(CLIPTextModel):
    """SDXL's second text encoder (OpenCLIP bigG): CLIPTextModel plus `text_projection` of the pooled output."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__(cfg)
        self.text_projection = nn.Linear(cfg.hidden_size, cfg.projection_dim, bias=False)

    def text_embeds(self, last_hidden: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """-> [B, projection_dim]: transformers' CLIPTextModelWithProjection(...).text_embeds."""
        return self.text_projection(self.pooled(last_hidden, input_ids))

    def sdxl_states(self, input_ids: torch.Tensor, clip_skip: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """SDXL's two readings: (penultimate hidden states [B, L, D], text_embeds [B, projection_dim])."""
        penultimate, last = self.penultimate(input_ids, clip_skip)
        return penultimate, self.text_embeds(last, input_ids)


def projection_state_dict(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers CLIPTextModelWithProjection checkpoint -> CLIPTextModelWithProjection's state dict."""
    projection = {k: v for k, v in tensors.items() if k.startswith("text_projection.")}
    return {**checkpoint_state_dict({k: v for k, v in tensors.items() if k not in projection}), **projection}

"""Tiny random-weight Stable Diffusion models saved with diffusers/transformers, for tests.

Sizes are chosen so single-file architecture inference applies too: norm groups 32, text width a
multiple of 64 (64-wide heads), and SD 1.x's 8 U-Net heads / SD 2.x's 64-wide U-Net heads.
"""
from __future__ import annotations

import functools
import json
import shutil
import tempfile
from pathlib import Path

import torch

from sdrt.clip_vocab import bundled_vocabulary

# The real CLIP vocabulary (the one bundled with sdrt) as vocab.json/merges.txt, for transformers' CLIPTokenizer.
# Alive for the whole test session, deleted at exit.
_VOCABULARY_DIR = tempfile.TemporaryDirectory(prefix="sdrt-clip-vocabulary-")


def write_clip_vocabulary(folder: Path) -> Path:
    """Write sdrt's bundled CLIP vocabulary into `folder` as vocab.json + merges.txt, in the byte format of
    the Hub's CLIP tokenizer files."""
    vocab, merges = bundled_vocabulary()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
                                       encoding="utf-8")
    return folder


@functools.lru_cache(maxsize=1)
def clip_vocabulary() -> Path:
    """A folder holding the real CLIP vocabulary.json/merges.txt, written once per test session."""
    return write_clip_vocabulary(Path(_VOCABULARY_DIR.name))


KINDS = ("sd1", "sd2", "inpaint", "inpaint4")


def diffusers_pipeline(kind: str = "sd1", seed: int = 0):
    """A random-weight diffusers pipeline. kind: sd1 (conv projections, 8 heads), sd2 (linear projections,
    per-block 64-wide heads, upcast attention, gelu text encoder, v-prediction), inpaint (sd1 with a
    9-channel U-Net), inpaint4 (sd1 for the 4-channel inpainting pipeline)."""
    from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionInpaintPipeline, StableDiffusionPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    sd2 = kind == "sd2"
    width = 128
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=9 if kind == "inpaint" else 4, out_channels=4,
        block_out_channels=(64, 128) if sd2 else (32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=width, norm_num_groups=32,
        attention_head_dim=(1, 2) if sd2 else 8, use_linear_projection=sd2, upcast_attention=sd2)
    vae = AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=32,
                        layers_per_block=1, sample_size=16)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=width, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=width // 64, max_position_embeddings=77,
        hidden_act="gelu" if sd2 else "quick_gelu", projection_dim=width))
    tokenizer = CLIPTokenizer(str(clip_vocabulary() / "vocab.json"), str(clip_vocabulary() / "merges.txt"),
                              pad_token="!" if sd2 else "<|endoftext|>", model_max_length=77)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1,
                              prediction_type="v_prediction" if sd2 else "epsilon")
    cls = StableDiffusionInpaintPipeline if kind.startswith("inpaint") else StableDiffusionPipeline
    pipe = cls(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
               safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(torch.float32)


def save_pipeline(path: Path, kind: str = "sd1", seed: int = 0):
    """Save a tiny pipeline as a diffusers folder at `path`; returns the diffusers pipeline."""
    pipe = diffusers_pipeline(kind, seed)
    pipe.save_pretrained(str(path), safe_serialization=True)
    # transformers 5 writes only tokenizer.json; Hub SD folders carry the vocab.json/merges.txt pair
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(clip_vocabulary() / name, Path(path) / "tokenizer" / name)
    return pipe

"""Tiny random-weight SDXL base and refiner pipelines saved with diffusers/transformers, for tests.

The base: U-Net levels (no attention, attention) with transformer_layers_per_block (1, 2), 64-wide heads,
linear projections, the "text_time" added embedding; CLIPTextModel (64 wide, quick_gelu as CLIP ViT-L) + CLIPTextModelWithProjection
(64 wide, projection 32), contexts concatenated to 128. The refiner: the second encoder only, aesthetic-score ids.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from factories import clip_vocabulary

TIME_DIM = 8    # addition_time_embed_dim
PROJECTION = 32  # text_encoder_2's projection_dim


def _text_encoder(cls, seed: int, hidden_act: str):
    from transformers import CLIPTextConfig
    torch.manual_seed(seed)
    return cls(CLIPTextConfig(vocab_size=49408, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                              num_attention_heads=1, max_position_embeddings=77, hidden_act=hidden_act,
                              projection_dim=PROJECTION))


def _tokenizer(pad: str):
    from transformers import CLIPTokenizer
    return CLIPTokenizer(str(clip_vocabulary() / "vocab.json"), str(clip_vocabulary() / "merges.txt"),
                         pad_token=pad, model_max_length=77)


def sdxl_unet(refiner: bool = False, seed: int = 0, in_channels: int = 4):
    from diffusers import UNet2DConditionModel
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=in_channels, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2), attention_head_dim=(1, 1), use_linear_projection=True,
        norm_num_groups=32, cross_attention_dim=64 if refiner else 128, addition_embed_type="text_time",
        addition_time_embed_dim=TIME_DIM,
        projection_class_embeddings_input_dim=PROJECTION + (5 if refiner else 6) * TIME_DIM)


def diffusers_sdxl(refiner: bool = False, seed: int = 0, inpaint: bool = False, in_channels: int = 4):
    """A random-weight StableDiffusionXLPipeline (refiner: StableDiffusionXLImg2ImgPipeline with the second
    encoder only and aesthetic-score conditioning; inpaint: StableDiffusionXLInpaintPipeline, with
    in_channels=9 the inpainting U-Net of SDXL inpainting 0.1)."""
    import diffusers
    from diffusers import AutoencoderKL, EulerDiscreteScheduler
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    unet = sdxl_unet(refiner, seed, in_channels)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=32,
                        layers_per_block=1, sample_size=16, scaling_factor=0.13025, force_upcast=True)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading", interpolation_type="linear")
    text_encoder_2 = _text_encoder(CLIPTextModelWithProjection, seed + 3, "gelu")  # OpenCLIP bigG
    if refiner:
        pipe = diffusers.StableDiffusionXLImg2ImgPipeline(
            vae=vae, text_encoder=None, tokenizer=None, text_encoder_2=text_encoder_2, tokenizer_2=_tokenizer("!"),
            unet=unet, scheduler=scheduler, requires_aesthetics_score=True, force_zeros_for_empty_prompt=False)
    else:
        cls = diffusers.StableDiffusionXLInpaintPipeline if inpaint else diffusers.StableDiffusionXLPipeline
        pipe = cls(vae=vae, text_encoder=_text_encoder(CLIPTextModel, seed + 2, "quick_gelu"),
                   tokenizer=_tokenizer("<|endoftext|>"),
                   text_encoder_2=text_encoder_2, tokenizer_2=_tokenizer("!"), unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(torch.float32)


def save_sdxl(path: Path, refiner: bool = False, seed: int = 0, inpaint: bool = False, in_channels: int = 4):
    """Save a tiny SDXL pipeline as a diffusers folder at `path`; returns the diffusers pipeline."""
    pipe = diffusers_sdxl(refiner, seed, inpaint, in_channels)
    pipe.save_pretrained(str(path), safe_serialization=True)
    for folder in ("tokenizer", "tokenizer_2"):  # transformers 5 writes only tokenizer.json
        if (Path(path) / folder).is_dir():
            for name in ("vocab.json", "merges.txt"):
                shutil.copy(clip_vocabulary() / name, Path(path) / folder / name)
    return pipe


def load_sdxl_pairs(tmp_path_factory) -> dict:
    """"base" / "refiner" -> (sdrt pipeline, diffusers pipeline, folder) on the same tiny weights (CPU float32)."""
    import sdrt
    out = {}
    for name in ("base", "refiner"):
        path = tmp_path_factory.mktemp(name)
        reference = save_sdxl(path, refiner=name == "refiner")
        out[name] = (sdrt.load(path, device="cpu", dtype="float32"), reference, path)
    return out

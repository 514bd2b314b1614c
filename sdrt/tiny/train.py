"""Train the bundled tiny model on the synthetic shapes dataset, with sdrt's own reference modules.

    python -m sdrt.tiny.train --out sdrt/assets/tiny-sd

Three stages, all seeded: (1) a VAE (64x64 RGB <-> 8x8x4 latents, SD's 8x reduction; trained
mostly on 32x32 crops, which costs a quarter and teaches the same local rendering), (2) the latents' scaling
factor, (3) a CLIP-architecture text encoder and a conditional U-Net trained together on the
diffusion loss, with 10% of captions dropped for classifier-free guidance. Runs on a 2-core CPU in
about 16 minutes (the committed model took 947 s); a progress bar shows the loss.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from sdrt.components import SD_SCHEDULER_CONFIG
from sdrt.config import CLIPTextConfig, UNetConfig, VAEConfig
from sdrt.models.clip import CLIPTextModel
from sdrt.models.unet import UNet
from sdrt.models.vae import AutoencoderKL
from sdrt.save import save_folder
from sdrt.tiny import shapes
from sdrt.tiny.vocab import write_tokenizer
from sdrt.tokenizer import CLIPTokenizer

log = logging.getLogger(__name__)

WORDS = ("a", "on", "background") + tuple(shapes.COLORS) + shapes.SHAPES
VAE_CONFIG = VAEConfig(block_out_channels=(16, 32, 64, 64), layers_per_block=1, latent_channels=4, norm_num_groups=8,
                       sample_size=shapes.IMAGE_SIZE)
# sized so a training step costs ~10 GFLOP: a 2-core CPU does a few thousand in half an hour
UNET_CONFIG = UNetConfig(sample_size=shapes.IMAGE_SIZE // 8, block_out_channels=(32, 64), layers_per_block=1,
                         down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                         up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                         cross_attention_dim=64, attention_head_dim=4, norm_num_groups=8)
CFG_DROPOUT = 0.1


def clip_config(vocab_size: int) -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                          num_attention_heads=2, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=64)


def _cosine_lr(step: int, total: int, base: float, warmup: int = 100) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train_vae(steps: int, rng: np.random.Generator, crop_batch: int = 24, full_batch: int = 8,
              full_size_steps: int = 300) -> AutoencoderKL:
    """Most steps see 32x32 crops aligned to the 8-pixel latent grid (a quarter of the cost: the
    convolutions learn the same local rendering); the last ones see whole images, for the mid-block
    attention's global view."""
    vae = AutoencoderKL(VAE_CONFIG).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    bar = tqdm(range(steps), desc="vae", mininterval=2)
    half = shapes.IMAGE_SIZE // 2
    for step in bar:
        cropped = step < steps - full_size_steps
        images, _ = shapes.batch(rng, crop_batch if cropped else full_batch)
        x = torch.from_numpy(images)
        if cropped:
            top, left = (int(v) * 8 for v in rng.integers(0, half // 8 + 1, size=2))
            x = x[:, :, top:top + half, left:left + half]
        mean, logvar = vae.encode(x)
        z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
        recon = vae.decode(z)
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).mean()
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + 1e-6 * kl
        for group in opt.param_groups:
            group["lr"] = _cosine_lr(step, steps, 2e-3)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_dataset(vae: AutoencoderKL, n: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    means, stds, captions = [], [], []
    for start in tqdm(range(0, n, 256), desc="encode", mininterval=2):
        images, caps = shapes.batch(rng, min(256, n - start))
        mean, logvar = vae.encode(torch.from_numpy(images))
        means.append(mean)
        stds.append(torch.exp(0.5 * logvar))
        captions += caps
    return torch.cat(means), torch.cat(stds), captions


def train_unet(steps: int, batch_size: int, means, stds, captions, scaling: float, tokenizer: CLIPTokenizer,
               vocab_size: int, seed: int) -> tuple[CLIPTextModel, UNet]:
    gen = torch.Generator().manual_seed(seed)
    text_encoder, unet = CLIPTextModel(clip_config(vocab_size)).train(), UNet(UNET_CONFIG).train()
    params = list(text_encoder.parameters()) + list(unet.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-2)
    cfg = SD_SCHEDULER_CONFIG
    betas = torch.linspace(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5, cfg["num_train_timesteps"]) ** 2
    alphas_cumprod = torch.cumprod(1 - betas, dim=0)
    ids = tokenizer(captions)
    empty = tokenizer([""])[0]
    bar = tqdm(range(steps), desc="unet", mininterval=2)
    for step in bar:
        idx = torch.randint(len(captions), (batch_size,), generator=gen)
        latents = (means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=gen)) * scaling
        batch_ids = ids[idx].clone()
        batch_ids[torch.rand(batch_size, generator=gen) < CFG_DROPOUT] = empty
        t = torch.randint(cfg["num_train_timesteps"], (batch_size,), generator=gen)
        noise = torch.randn(latents.shape, generator=gen)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        loss = F.mse_loss(unet(noisy, t, text_encoder(batch_ids)), noise)
        for group in opt.param_groups:
            group["lr"] = _cosine_lr(step, steps, 1e-3)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    return text_encoder.eval().requires_grad_(False), unet.eval().requires_grad_(False)


def _cached_vae(work: Path, steps: int, rng: np.random.Generator) -> AutoencoderKL:
    """Stage 1, cached in `work` so a later run (other U-Net settings, say) starts from the same VAE."""
    path = work / "vae.safetensors"
    if path.is_file():
        vae = AutoencoderKL(VAE_CONFIG)
        vae.load_state_dict(load_file(str(path)))
        log.info("reusing the VAE in %s", path)
        return vae.eval().requires_grad_(False)
    vae = train_vae(steps, rng)
    save_file(vae.state_dict(), str(path))
    return vae


def _cached_latents(work: Path, vae: AutoencoderKL, n: int, rng: np.random.Generator):
    path = work / f"latents-{n}.pt"
    if path.is_file():
        data = torch.load(path, weights_only=True)
        return data["means"], data["stds"], data["captions"]
    means, stds, captions = encode_dataset(vae, n, rng)
    torch.save({"means": means, "stds": stds, "captions": captions}, path)
    return means, stds, captions


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="diffusers folder to write")
    parser.add_argument("--work", type=Path, default=None,
                        help="keep the stage caches (trained VAE, encoded dataset) here, to reuse them in a later "
                             "run; default: a temporary folder")
    parser.add_argument("--vae-steps", type=int, default=3000)
    parser.add_argument("--unet-steps", type=int, default=4000)
    parser.add_argument("--dataset-size", type=int, default=20000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        vae = _cached_vae(work, args.vae_steps, rng)
        means, stds, captions = _cached_latents(work, vae, args.dataset_size, rng)
        scaling = round(float(1.0 / means.std()), 5)
        log.info("latent scaling factor %.5f", scaling)
        vae.config = dataclasses.replace(VAE_CONFIG, scaling_factor=scaling)

        tok_dir = Path(tmp) / "tokenizer"
        vocab_size = write_tokenizer(tok_dir, WORDS)
        tokenizer = CLIPTokenizer.from_folder(tok_dir)
        text_encoder, unet = train_unet(args.unet_steps, args.batch_size, means, stds, captions, scaling,
                                        tokenizer, vocab_size, args.seed)
        save_folder(args.out, text_encoder=text_encoder, unet=unet, vae=vae, tokenizer_folder=tok_dir,
                    scheduler_config=dict(SD_SCHEDULER_CONFIG))
    log.info("wrote %s in %.0f s", args.out, time.perf_counter() - started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Backend parity: a backend against the float32 torch reference, component by component and end to end.

    report = sdrt.parity.compare("path/to/model", "triton", dtype="float16")
    print(report.table()); report.passed

Both run the same inputs: the same token ids (text encoder), the same latents, timestep and context (one
U-Net call on the CFG batch), the same latents (VAE decode: the reference's final latents), and the same
prompts, seeds and settings end to end (final image). For each: max abs error and cosine similarity
against the reference; the final image also gets its PSNR (pixels in [0, 1]).

Thresholds, and where they come from. The reference's own low-precision error is measured in the same
run: the `torch` backend in the same dtype on the same inputs (sdrt's torch modules reproduce diffusers'
in float32 - tests/test_pipeline.py - so this is diffusers' own fp16-vs-fp32 error, the issue's yardstick).
A backend passes a row when (flash-attention's rule, as for the kernels):
  - max abs error   <= MAX_ERROR_RATIO x the torch error + FLOAT32_FLOOR x max|reference|
  - 1 - cosine      <= MAX_ERROR_RATIO x (1 - torch cosine) + 1e-6
  - image PSNR      >= min(torch PSNR, PSNR_CAP_DB) - 20 log10(MAX_ERROR_RATIO)  (twice the error = 6 dB less)
FLOAT32_FLOOR lets float32 backends differ from the reference by summation order only: the triton
kernels in float32 differ from torch by 3e-6 of the latents' magnitude after two steps of the tiny model
(tests/test_triton_backend.py), so 1e-4 leaves a 30x margin. Measured on the tiny model on a CPU
(`random:tiny`, 2 prompts, 20 DDIM steps, CFG 7.5, 16x16): torch bfloat16 vs float32: U-Net max abs 0.029,
cosine 0.99991, image PSNR 43.0 dB; torch float16 vs float32: U-Net 0.0044, cosine 0.999998, image 60.3 dB.
The limits scale with what each run measures, so they carry over to any model size and GPU.

Every run is its own: fresh components and pipeline, the same inputs. With `backend="torch"` in float32 the
candidate is a second float32 torch run, judged against the reference with the float32 floor only (it
must reproduce it). With `backend="torch"` in a lower precision the candidate would be the baseline
itself, which no rule can fail: the report is "baseline only" (distances shown, `passed` None).

Matmul policy: the reference and every other run execute with TF32 off (`MATMUL_POLICY`), so a float32
candidate on CUDA is measured in float32 too; the report states it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from sdrt.backends import BACKENDS
from sdrt.checks import check_positive_int
from sdrt.components import Components, load_components
from sdrt.errors import InvalidInputError
from sdrt.models import random_weights
from sdrt.pipeline import Pipeline, _resolve_device, _resolve_dtype, from_components

log = logging.getLogger(__name__)

MAX_ERROR_RATIO = 2.0
FLOAT32_FLOOR = 1e-4
COSINE_FLOOR = 1e-6
PSNR_CAP_DB = 60.0
DEFAULT_PROMPTS = ("a photograph of an astronaut riding a horse", "a watercolor painting of a lighthouse at dusk")
RANDOM_PREFIX = "random:"  # "random:tiny" | "random:sd15" | "random:sd21": sdrt.models.random_weights, built in memory
COMPONENTS = ("text_encoder", "unet", "vae_decode", "image")
MATMUL_POLICY = ("TF32 off (torch.backends.cuda.matmul.allow_tf32 = cudnn.allow_tf32 = False) "
                 "for the reference and every run")


@dataclass
class Distance:
    max_abs: float
    cosine: float
    psnr: Optional[float] = None  # dB, images only


@dataclass
class Row:
    component: str
    backend: Distance
    baseline: Distance
    max_abs_limit: float
    cosine_limit: float
    psnr_limit: Optional[float]
    passed: Optional[bool]  # None: baseline only, nothing judged


@dataclass
class ParityReport:
    model: str
    backend: str
    dtype: str
    device: str
    baseline: str  # what the limits were measured on, e.g. "torch float16" or "the float32 reference"
    baseline_only: bool = False  # torch in a low precision: the run is the yardstick itself, not judged
    matmul_policy: str = MATMUL_POLICY
    rows: list[Row] = field(default_factory=list)

    @property
    def passed(self) -> Optional[bool]:
        """True/False for a judged candidate; None for a baseline-only report."""
        return None if self.baseline_only else all(r.passed for r in self.rows)

    def to_dict(self) -> dict:
        return dict(asdict(self), passed=self.passed)

    def table(self) -> str:
        head = (f"{'component':12} {'max abs':>10} {'limit':>10} {'(' + self.baseline + ')':>16} "
                f"{'cosine':>10} {'limit':>10} {'PSNR dB':>8} {'limit':>7}  result")
        lines = [f"sdrt check: {self.backend} {self.dtype} on {self.device} vs torch float32, model {self.model}",
                 f"matmul policy: {self.matmul_policy}", head]
        for r in self.rows:
            psnr = "" if r.backend.psnr is None else f"{r.backend.psnr:8.2f} {r.psnr_limit:7.2f}"
            result = "-" if r.passed is None else "ok" if r.passed else "FAIL"
            lines.append(f"{r.component:12} {r.backend.max_abs:10.3g} {r.max_abs_limit:10.3g} "
                         f"{r.baseline.max_abs:16.3g} {r.backend.cosine:10.6f} {r.cosine_limit:10.6f} "
                         f"{psnr:16}  {result}")
        if self.baseline_only:
            lines.append(f"BASELINE ONLY: torch {self.dtype} is the yardstick other backends are judged by; "
                         f"nothing to judge")
        else:
            lines.append("PASS" if self.passed else "FAIL")
        return "\n".join(lines)


def distance(x: torch.Tensor, ref: torch.Tensor, psnr: bool = False) -> Distance:
    x, ref = x.detach().double().cpu().flatten(), ref.detach().double().cpu().flatten()
    cos = F.cosine_similarity(x, ref, dim=0).item() if x.norm() > 0 and ref.norm() > 0 else float(torch.equal(x, ref))
    mse = (x - ref).pow(2).mean().item()
    return Distance(max_abs=(x - ref).abs().max().item(), cosine=cos,
                    psnr=(math.inf if mse == 0 else -10 * math.log10(mse)) if psnr else None)


def judge(component: str, backend: Distance, baseline: Distance, ref_scale: float) -> Row:
    max_abs_limit = MAX_ERROR_RATIO * baseline.max_abs + FLOAT32_FLOOR * ref_scale
    cosine_limit = 1 - (MAX_ERROR_RATIO * (1 - baseline.cosine) + COSINE_FLOOR)
    psnr_limit = None
    ok = backend.max_abs <= max_abs_limit and backend.cosine >= cosine_limit
    if backend.psnr is not None:
        psnr_limit = min(baseline.psnr, PSNR_CAP_DB) - 20 * math.log10(MAX_ERROR_RATIO)
        ok = ok and backend.psnr >= psnr_limit
    return Row(component, backend, baseline, max_abs_limit, cosine_limit, psnr_limit, ok)


@contextlib.contextmanager
def _exact_float32() -> Iterator[None]:
    """MATMUL_POLICY: TF32 off, so float32 on CUDA (reference and candidates alike) is float32."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _components(model: Union[str, Path, None], device: torch.device) -> Components:
    if isinstance(model, str) and model.startswith(RANDOM_PREFIX):
        name = model[len(RANDOM_PREFIX):]
        if name not in random_weights.MODELS:
            raise InvalidInputError(f"model={model!r}: random models are "
                                    f"{', '.join(RANDOM_PREFIX + m for m in random_weights.MODELS)}")
        return random_weights.components(name, device=device)
    return load_components(model, dtype=torch.float32, device=device)


@dataclass
class _Inputs:
    ids: Optional[torch.Tensor]  # [B, 77] (None: an SDXL refiner, which has no first tokenizer)
    sample: torch.Tensor     # [2B, 4, h, w] float32
    timestep: torch.Tensor   # 0-d
    context: torch.Tensor    # [2B, 77, D] float32: the reference's [uncond; cond]
    latents: Optional[torch.Tensor] = None  # the reference's final latents (for the VAE decode)
    added: dict = field(default_factory=dict)  # SDXL: the U-Net's text_embeds and time_ids [2B, ...]


def _text_states(pipe: Pipeline, ids: torch.Tensor, texts: list[str]) -> tuple[torch.Tensor, dict]:
    """The text encoder row: SD's last hidden states of `ids`; SDXL's both encoders' penultimate states
    concatenated (tokenized by the pipeline itself), with the pooled text_embeds beside."""
    if hasattr(pipe, "text_encoder_2"):
        context, text_embeds = pipe._encode_text(texts)
        return context.float(), {"text_embeds": text_embeds.float()}
    return pipe.text_encoder(ids).float(), {}


def _sdxl_added(unet_config, text_embeds: torch.Tensor, h: int, w: int) -> dict:
    """text_embeds with time ids [rows, n]: (original h, w; crop 0, 0; target h, w), or the refiner's
    (h, w, 0, 0, aesthetic score 6)."""
    n = (unet_config.projection_class_embeddings_input_dim - text_embeds.shape[-1]) // unet_config.addition_time_embed_dim
    row = [h, w, 0, 0, h, w] if n == 6 else [h, w, 0, 0, 6.0]
    ids = torch.tensor([row] * text_embeds.shape[0], dtype=torch.float32, device=text_embeds.device)
    return {"text_embeds": text_embeds, "time_ids": ids}


@torch.inference_mode()
def _measure(pipe: Pipeline, inputs: _Inputs, prompts: list[str], seeds: list[int], settings: dict) -> dict:
    dt = pipe.dtype
    added = {k: v.to(dt) for k, v in inputs.added.items()}
    out = dict(text_encoder=_text_states(pipe, inputs.ids, prompts)[0],
               unet=pipe.unet(inputs.sample.to(dt), inputs.timestep, inputs.context.to(dt), **added).float())
    result = pipe(prompts, seed=seeds, output="np", **settings)
    out["final_latents"] = result.latents
    out["image"] = torch.from_numpy(np.ascontiguousarray(result.images))
    latents = result.latents if inputs.latents is None else inputs.latents
    out["vae_decode"] = pipe.vae.decode((latents / pipe.vae.scaling_factor).to(dt)).float()
    return out


def compare(model: Union[str, Path, None], backend: str = "torch", *, dtype: Union[str, torch.dtype, None] = None,
            device: Union[str, torch.device, None] = None, prompts: Sequence[str] = DEFAULT_PROMPTS,
            seeds: Optional[Sequence[int]] = None, steps: int = 20, guidance_scale: float = 7.5,
            scheduler: str = "ddim", height: Optional[int] = None, width: Optional[int] = None) -> ParityReport:
    """Run the float32 torch reference, the torch baseline in `dtype` and `backend` in `dtype` on the same
    inputs, all under MATMUL_POLICY; see the module docstring for the metrics, limits and the torch cases.
    seeds: one per prompt (default 0, 1, ...)."""
    if backend not in BACKENDS:
        raise InvalidInputError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    device = _resolve_device(device)
    dtype = _resolve_dtype(dtype, device)
    steps = check_positive_int("steps", steps)
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise InvalidInputError("prompts must be a non-empty list of strings")
    seeds = list(range(len(prompts))) if seeds is None else list(seeds)
    if len(seeds) != len(prompts):
        raise InvalidInputError(f"seeds must hold one seed per prompt ({len(prompts)}), got {len(seeds)}")
    settings = dict(steps=steps, guidance_scale=guidance_scale, scheduler=scheduler, height=height, width=width)
    dtype_name = str(dtype).split(".")[-1]

    with _exact_float32():
        ref_pipe = from_components(_components(model, device), device=device, dtype=torch.float32)
        h, w = height or ref_pipe.native_size[0], width or ref_pipe.native_size[1]
        gen = torch.Generator("cpu").manual_seed(1234)
        with torch.inference_mode():
            texts = [""] * len(prompts) + prompts
            ids = None if ref_pipe.tokenizer is None else ref_pipe.tokenizer(texts).to(device)
            context, pooled = _text_states(ref_pipe, ids, texts)
            added = {} if not pooled else _sdxl_added(ref_pipe.unet.config, pooled["text_embeds"], h, w)
        sample = torch.randn(2 * len(prompts), 4, h // ref_pipe.vae_scale_factor, w // ref_pipe.vae_scale_factor,
                             generator=gen).to(device)
        inputs = _Inputs(ids=None if ids is None else ids[len(prompts):], sample=sample,
                         timestep=torch.tensor(500, device=device), context=context, added=added)
        ref = _measure(ref_pipe, inputs, prompts, seeds, settings)
        del ref_pipe
        inputs.latents = ref["final_latents"]

        baseline_only = backend == "torch" and dtype != torch.float32
        # float32: the reference is the baseline (its error is zero, the limits the float32 floor)
        baseline = ref if dtype == torch.float32 else _run("torch", model, device, dtype, inputs, prompts, seeds,
                                                           settings)
        candidate = baseline if baseline_only else _run(backend, model, device, dtype, inputs, prompts, seeds,
                                                        settings)

    report = ParityReport(model="the bundled tiny model" if model is None else str(model), backend=backend,
                          dtype=dtype_name, device=str(device),
                          baseline="the float32 reference" if dtype == torch.float32 else f"torch {dtype_name}",
                          baseline_only=baseline_only)
    for component in COMPONENTS:
        psnr = component == "image"
        cand = distance(candidate[component], ref[component], psnr)
        base = distance(baseline[component], ref[component], psnr)
        row = judge(component, cand, base, ref[component].abs().max().item())
        report.rows.append(dataclasses.replace(row, passed=None) if baseline_only else row)
    log.info("parity %s: %s", backend, {True: "pass", False: "FAIL", None: "baseline only"}[report.passed])
    return report


def _run(backend: str, model, device: torch.device, dtype: torch.dtype, inputs: _Inputs, prompts: list[str],
         seeds: list[int], settings: dict) -> dict:
    """One run on fresh components and pipeline (so nothing is shared with another run), then freed."""
    pipe = from_components(_components(model, device), backend=backend, device=device, dtype=dtype)
    out = _measure(pipe, inputs, prompts, seeds, settings)
    del pipe
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out

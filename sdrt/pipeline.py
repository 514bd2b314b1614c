"""txt2img, img2img and inpainting on any backend: `sdrt.load(...)` and `Pipeline.__call__`.

Seeds, noise order and the math of each mode follow diffusers' StableDiffusionPipeline,
StableDiffusionImg2ImgPipeline and StableDiffusionInpaintPipeline, so the same seed and settings give the
same picture on the same weights. Mode: `image` alone = img2img, `image` + `mask` = inpainting; an
unset `strength` is each diffusers pipeline's default (img2img 0.8, inpainting 1.0).

Where sdrt deliberately differs from diffusers:
- With an ordinary 4-channel U-Net, inpainting composites the decoded image back onto the input outside
  the mask, so those pixels are exactly the input's (diffusers returns the VAE round trip there).
- Explicit `latents` are always the noise of the start: txt2img starts from latents * init_noise_sigma;
  with an image and strength < 1 they are the noise added to the image latents (diffusers' inpainting
  ignores the image in that case).
- A 9-channel inpainting model needs `image` and `mask`; the image sets the output size.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from sdrt import images as imgs
from sdrt.backends import prepare_backend
from sdrt.backends.auto import resolve_backend
from sdrt.checks import (Limits, check_guidance, check_image_count, check_output, check_pixels, check_positive_int,
                         check_size, check_steps, check_text, strength_or_default)
from sdrt.components import BUNDLED_MODEL, Components, load_components
from sdrt.control import DEFAULT_SCALES, ControlResiduals, check_control
from sdrt.control_backends import attach_controlnets, check_controlnet_backend
from sdrt.controlnet_loading import load_controlnets
from sdrt.denoise import LatentBlend, denoise
from sdrt.errors import InvalidInputError, ModelLoadError, NumericalError
from sdrt.graphs import DenoiseGraphs, GraphCache
from sdrt.guidance import uses_cfg
from sdrt.lora import LoraMixin
from sdrt.lora.api import lora_folders
from sdrt.models.clip import CLIPTextModel
from sdrt.prompt_encoding import PromptOptions, check_prompt_options, encode_prompt_pair
from sdrt.schedulers import make_scheduler
from sdrt.seeds import NoiseSource, SeedArg
from sdrt.textual_inversion import load_textual_inversion
from sdrt.vae_loading import load_separate_vae
from sdrt.vae_precision import VAEPrecision

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DEVICE_TYPES = ("cpu", "cuda")
GRAPH_BACKENDS = ("torch", "triton")  # backends whose components can run inside a captured loop


@dataclass
class GenerationResult:
    images: Union[list[PIL.Image.Image], np.ndarray, torch.Tensor]  # per `output`: PIL list, [B,H,W,3] or latents
    latents: torch.Tensor  # final latents [B, 4, h, w] float32, in the U-Net's (scaled) space
    seeds: list[int]  # one per image
    timings: dict[str, float] = field(default_factory=dict)  # seconds per phase, and "total"


def load(model: Union[str, Path, None] = None, *, backend: str = "torch", device: Union[str, torch.device, None] = None,
         dtype: Union[str, torch.dtype, None] = None, tokenizer: Union[str, Path, None] = None,
         cuda_graphs: Optional[bool] = None, prediction_type: Optional[str] = None,
         limits: Optional[Limits] = None, lora_dirs: Optional[Sequence[Union[str, Path]]] = None,
         controlnet: Union[str, Path, Sequence[Union[str, Path]], None] = None,
         vae: Union[str, Path, None] = None) -> "Pipeline":
    """A ready pipeline. `model`: a diffusers folder or a single-file .safetensors checkpoint; None = the bundled
    tiny model. The tokenizer: the `tokenizer` folder, else the model's `tokenizer/` (for a single file, one beside
    it), else CLIP's vocabulary bundled with sdrt, with SD 1.x's or SD 2.x's pad token.
    prediction_type: "epsilon" | "v_prediction", overriding the model's scheduler config or, for a single
    file, what is inferred from it (an SD 2.x file that says nothing is assumed 768-v, with a warning).
    device: "cpu" | "cuda" | "cuda:N" (default cuda when available); dtype: "float32" | "float16" |
    "bfloat16" (default float16 on cuda, float32 on cpu).
    cuda_graphs: capture the denoising loop in CUDA graphs (see `sdrt.graphs`, `Pipeline.warmup`); default
    on for the triton backend on CUDA; the torch backend on CUDA may opt in; other backends and the CPU cannot.
    limits: the bounds on each call (`sdrt.Limits`); default `Limits.from_env()`, the SDRT_MAX_* variables.
    lora_dirs: folders in which prompts' `<lora:NAME:WEIGHT>` tags find NAME (see `sdrt.lora.prompt_loras`).
    controlnet: a ControlNet (diffusers folder or single file) or a list of them, each checked to fit the model;
    calls then take control_image= (see `Pipeline.__call__`, `sdrt.control`).
    vae: a VAE folder or file replacing the model's (e.g. SDXL's fp16-fix VAE); see `sdrt.vae_loading`."""
    _check_path("model", model)
    _check_path("vae", vae)
    folders = None if lora_dirs is None else lora_folders(lora_dirs)
    check_controlnet_backend(controlnet, backend)
    _check_path("tokenizer", tokenizer)
    device = _resolve_device(device)
    dtype = _resolve_dtype(dtype, device)
    backend = resolve_backend(backend, device, dtype)  # "auto": the fastest installed one (sdrt.backends.auto)
    graphed = _resolve_cuda_graphs(cuda_graphs, backend, device)
    limits = _resolve_limits(limits)
    if model is None and not BUNDLED_MODEL.is_dir():
        raise ModelLoadError(f"the bundled tiny model is not installed ({BUNDLED_MODEL} is missing); "
                             f"pass model=<diffusers folder or .safetensors checkpoint>")
    components = load_components(model, dtype=dtype, device=device, tokenizer=tokenizer,
                                 prediction_type=prediction_type)
    if vae is not None:
        components.vae = load_separate_vae(vae, components.vae.config, dtype, device)
    pipe = _assemble(components, backend, device, dtype, graphed, limits)
    pipe._lora_folders = folders
    if controlnet is not None:
        attach_controlnets(pipe, components, load_controlnets(controlnet, dtype, device, pipe.unet.config,
                                                              pipe.vae_scale_factor, pipe.model))
    return pipe


def from_components(components: Components, *, backend: str = "torch", device: Union[str, torch.device, None] = None,
                    dtype: Union[str, torch.dtype, None] = None, cuda_graphs: Optional[bool] = None,
                    limits: Optional[Limits] = None) -> "Pipeline":
    """A pipeline on components built in memory (e.g. random weights for benchmarks), as `load` makes one;
    the backend may move and convert the modules in place."""
    device = _resolve_device(device)
    dtype = _resolve_dtype(dtype, device)
    backend = resolve_backend(backend, device, dtype)  # "auto": the fastest installed one (sdrt.backends.auto)
    return _assemble(components, backend, device, dtype, _resolve_cuda_graphs(cuda_graphs, backend, device),
                     _resolve_limits(limits))


def _assemble(components: Components, backend: str, device: torch.device, dtype: torch.dtype,
              graphed: bool, limits: Limits) -> "Pipeline":
    from sdrt.sdxl_pipeline import pipeline_class  # SDXL's pipeline builds on this module
    cls = pipeline_class(components, backend)
    components = prepare_backend(backend, components, device, dtype)
    log.info("loaded %s on %s/%s with the %s backend", components.source, device, dtype, backend)
    pipe = cls(components, device=device, dtype=dtype, backend=backend, limits=limits)
    if graphed:
        pipe.denoiser = DenoiseGraphs(GraphCache.for_device(device))
    return pipe


def _resolve_cuda_graphs(cuda_graphs: Optional[bool], backend: str, device: torch.device) -> bool:
    capable = device.type == "cuda" and backend in GRAPH_BACKENDS
    if cuda_graphs is None:
        return capable and backend == "triton"
    if not isinstance(cuda_graphs, bool):
        raise InvalidInputError(f"cuda_graphs must be None, True or False, got {cuda_graphs!r}")
    if cuda_graphs and not capable:
        raise InvalidInputError(f"cuda_graphs=True needs device='cuda' and backend {' or '.join(GRAPH_BACKENDS)}; "
                                f"got device={device}, backend={backend!r}")
    return cuda_graphs


def _check_path(name: str, value) -> None:
    if value is not None and not (isinstance(value, (str, os.PathLike)) and isinstance(os.fspath(value), str)):
        raise InvalidInputError(f"{name} must be None or a path (str or os.PathLike), got {type(value).__name__} "
                                f"{value!r:.80}")


def _resolve_limits(limits: Optional[Limits]) -> Limits:
    if limits is None:
        return Limits.from_env()
    if not isinstance(limits, Limits):
        raise InvalidInputError(f"limits must be None or an sdrt.Limits, got {type(limits).__name__}")
    return limits


def _resolve_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in DEVICE_TYPES:
        raise InvalidInputError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidInputError(f"device={device!r} but CUDA is not available here; use device='cpu'")
    return dev


def _resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise InvalidInputError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")


def negative_texts(negative_prompt, n_prompts: int) -> list[str]:
    """One negative text per prompt: "" each when None, one string repeated, or one per prompt."""
    negatives = [""] * n_prompts if negative_prompt is None else _text_list("negative_prompt", negative_prompt)
    if len(negatives) == 1 and n_prompts > 1:
        negatives = negatives * n_prompts
    if len(negatives) != n_prompts:
        raise InvalidInputError(f"negative_prompt must be one string or one per prompt ({n_prompts}), "
                                f"got {len(negatives)}")
    return negatives


def min_chunk_count(prompt_embeds: Optional[torch.Tensor], tokenizer) -> int:
    """The chunk count encoded negatives must reach: given prompt_embeds' (77 * k tokens), else 1."""
    return 1 if prompt_embeds is None else max(1, prompt_embeds.shape[1] // tokenizer.model_max_length)


def _text_list(name: str, value: Union[str, Sequence[str]]) -> list[str]:
    if isinstance(value, str):
        return [check_text(name, value)]
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return [check_text(f"{name}[{i}]", v) for i, v in enumerate(value)]
    raise InvalidInputError(f"{name} must be a string or a non-empty list of strings, got {value!r:.200}")


def _check_negatives(negative_prompt, negative_prompt_embeds) -> None:
    """What can be checked of the negatives before any text is encoded (their count and shape come later)."""
    if negative_prompt_embeds is None:
        if negative_prompt is not None:
            _text_list("negative_prompt", negative_prompt)
        return
    if negative_prompt is not None:
        raise InvalidInputError("pass either negative_prompt or negative_prompt_embeds, not both")
    if not torch.is_tensor(negative_prompt_embeds):
        raise InvalidInputError(f"negative_prompt_embeds must be a tensor, got {type(negative_prompt_embeds).__name__}")
    _check_tensor("negative_prompt_embeds", negative_prompt_embeds)


def _check_tensor(name: str, value: torch.Tensor) -> None:
    """A floating-point tensor of finite values (dtype and values; the caller checks the shape)."""
    if not value.is_floating_point():
        raise InvalidInputError(f"{name} must be a floating-point tensor (float32, float16 or bfloat16), "
                                f"got dtype {str(value.dtype).removeprefix('torch.')}")
    if not torch.isfinite(value).all():
        raise InvalidInputError(f"{name} holds NaN or inf")


def _check_guidance_arg(value) -> Union[float, list[float]]:
    if isinstance(value, (list, tuple)):
        if not value:
            raise InvalidInputError("guidance_scale must be a number or a non-empty list of numbers, got []")
        return [check_guidance(g) for g in value]
    return check_guidance(value)


def _guidance_per_image(guidance: Union[float, list[float]], n_prompts: int, num_images: int):
    """A per-prompt list -> one scale per image (each prompt's num_images in a row); a number stays one."""
    if not isinstance(guidance, list):
        return guidance
    if len(guidance) != n_prompts:
        raise InvalidInputError(f"a guidance_scale list must hold one scale per prompt ({n_prompts}), "
                                f"got {len(guidance)}")
    return [g for g in guidance for _ in range(num_images)]


class Pipeline(LoraMixin):
    """One loaded model on one backend. Call it to generate; see `sdrt.load`."""

    honours_force_upcast = False  # the VAE config's force_upcast: diffusers' SD 1.x/2.x pipelines ignore it

    def __init__(self, components: Components, *, device: torch.device, dtype: torch.dtype, backend: str,
                 limits: Optional[Limits] = None):
        self.tokenizer = components.tokenizer
        self.text_encoder = components.text_encoder
        self.unet = components.unet
        self.vae = components.vae
        self.scheduler_config = dict(components.scheduler_config)
        self.model = components.source
        self.device, self.dtype, self.backend = device, dtype, backend
        self.limits = _resolve_limits(limits)  # checked by every call; a service may lower them
        self.vae_scale_factor = self.vae.config.downsample_factor
        # fp16/bf16 torch VAE: an overflowing decode is redone in float32 (see sdrt.vae_precision)
        self.vae_precision = VAEPrecision(self.vae, dtype,
                                          force_upcast=self.honours_force_upcast and self.vae.config.force_upcast)
        self.is_inpainting_model = components.is_inpainting_unet
        side = self.unet.config.sample_size * self.vae_scale_factor
        self.native_size = (side, side)  # (height, width) the model was trained at
        # the loop runner: `denoise` itself, or a `DenoiseGraphs` replaying captured loops (same signature)
        self.denoiser: Callable[..., torch.Tensor] = denoise
        self.controlnets: list = []  # sdrt.models.controlnet.ControlNet, set by load(controlnet=...)
        self.control_scale_defaults = DEFAULT_SCALES  # per mode, as the diffusers ControlNet pipelines
        self.embedding_tokens: dict[str, list[int]] = {}  # textual inversion: token -> its vectors' ids
        self.text_layers = (0 if components.text_encoder is None  # clip_skip's bound (an SDXL refiner: no encoder 1)
                            else components.text_encoder.config.num_hidden_layers)

    def __repr__(self) -> str:
        return f"Pipeline(model={self.model!r}, backend={self.backend!r}, device={self.device}, dtype={self.dtype})"

    @torch.inference_mode()
    def __call__(self, prompt: Union[str, Sequence[str], None] = None, negative_prompt: Union[str, Sequence[str], None] = None,
                 steps: int = 30, guidance_scale: Union[float, Sequence[float]] = 7.5, scheduler: Optional[str] = "ddim", eta: float = 0.0,
                 height: Optional[int] = None, width: Optional[int] = None, num_images: int = 1, seed: SeedArg = None,
                 image: Any = None, strength: Optional[float] = None, mask: Any = None, latents: Optional[torch.Tensor] = None,
                 prompt_embeds: Optional[torch.Tensor] = None, negative_prompt_embeds: Optional[torch.Tensor] = None,
                 output: str = "pil", progress: Optional[Callable[[int, int], None]] = None,
                 clip_skip: Optional[int] = None, prompt_chunking: bool = True,
                 emphasis: str = "original", control_image: Any = None,
                 controlnet_conditioning_scale: Union[float, Sequence[float], None] = None,
                 control_guidance_start: Union[float, Sequence[float]] = 0.0,
                 control_guidance_end: Union[float, Sequence[float]] = 1.0,
                 guess_mode: bool = False, control_preprocess: Union[str, Sequence[Optional[str]], None] = None
                 ) -> GenerationResult:
        """Generate images; `progress(done, total)` is called after every denoising step.
        strength: how much of the image to redo, in [0, 1]; None = diffusers' default for the mode
        (img2img 0.8, inpainting 1.0).
        guidance_scale: one number, or a list with one per prompt (all > 1 or all <= 1): each prompt's images
        are then the same as in a call of their own with that scale and their seeds (a seed list).
        Prompts (see `sdrt.prompt_encoding`): longer than 75 tokens they are encoded in 75-token chunks
        (prompt_chunking=False truncates instead); `(word:1.3)` emphasis per `emphasis` ("original" | "no_norm"
        | "none"); clip_skip=N uses the text encoder's hidden state N layers before the last.
        With ControlNets (`load(controlnet=...)`): control_image, one image (a list: one per ControlNet) of the
        output's size, which it sets when height, width and image are not given; the scale, start and end are a
        number or one per ControlNet; an unset scale is diffusers' default for the mode (txt2img 1.0, img2img
        0.8, inpainting 0.5); control_preprocess: a preprocessor name such as "canny" (or one per ControlNet,
        None = ready) run on the control images first; see `sdrt.control`, `sdrt.control_preprocess`.
        See the module docstring for the modes and README.md for the contract."""
        timer = _PhaseTimer(self.device)
        prompt, tag_loras = self._take_lora_tags(prompt, negative_prompt)  # <lora:NAME:W>: sdrt.lora.prompt_loras
        steps = check_steps(steps, self.limits)
        num_images = check_positive_int("num_images", num_images)
        if progress is not None and not callable(progress):
            raise InvalidInputError(f"progress must be None or a callable progress(done, total), got {progress!r:.80}")
        guidance = _check_guidance_arg(guidance_scale)
        strength = strength_or_default(strength, inpainting=mask is not None)
        output = check_output(output)
        cfg = uses_cfg(guidance)
        prompt_options = self._prompt_options(clip_skip, prompt_chunking, emphasis)
        sched = make_scheduler(scheduler, self.scheduler_config, eta)

        image_latents = imgs.latent_image(image)  # latents given as the image (a [n, 4, h, w] tensor), or None
        init_image = None if image is None or image_latents is not None else imgs.image_to_tensor(image)  # [1, 3, H, W]
        image_size = None if image is None else self._image_size(init_image, image_latents)
        control = check_control(len(self.controlnets), control_image, controlnet_conditioning_scale,
                                control_guidance_start, control_guidance_end, guess_mode,
                                self.control_scale_defaults["txt2img" if image is None else
                                                            "img2img" if mask is None else "inpaint"],
                                control_preprocess)
        if control is not None and image is None and height is None and width is None:
            height, width = control.size
        height, width = self._size(height, width, image_size)
        if control is not None:
            control.check_sizes(height, width)
        if mask is not None and image is None:
            raise InvalidInputError("mask needs image: pass the image to inpaint as image=")
        if mask is not None and image_latents is not None:
            raise InvalidInputError("inpainting needs a pixel image, got latents (a 4-channel tensor) as image=")
        if self.is_inpainting_model and mask is None:
            raise InvalidInputError(f"{self.model} is a 9-channel inpainting model: pass image= and mask=")
        mask_px = None if mask is None else imgs.mask_to_tensor(mask, height, width)  # [1, 1, H, W] of 0/1

        n_prompts = self._count_prompts(prompt, prompt_embeds)
        _check_negatives(negative_prompt, negative_prompt_embeds)
        batch = check_image_count(n_prompts * num_images, self.limits,
                                  f"num_images={num_images} x {n_prompts} prompt{'s' * (n_prompts > 1)}")
        guidance = _guidance_per_image(guidance, n_prompts, num_images)
        shape = (batch, 4, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if latents is not None and (not torch.is_tensor(latents) or tuple(latents.shape) != shape):
            raise InvalidInputError(f"latents must be a tensor of shape {list(shape)} (batch, 4, height/"
                                    f"{self.vae_scale_factor}, width/{self.vae_scale_factor}), got "
                                    f"{list(latents.shape) if torch.is_tensor(latents) else type(latents).__name__}")
        if latents is not None:
            _check_tensor("latents", latents)
        if image_latents is not None and image_latents.shape[0] not in (1, batch):
            raise InvalidInputError(f"latents given as image= must hold {'1 or ' * (batch > 1)}{batch} (one per "
                                    f"image) latents, got {image_latents.shape[0]}")
        noise = NoiseSource(seed, batch)
        schedule, start, add_noise = self._timesteps(sched, steps, 1.0 if image is None else strength,
                                                     image is not None)

        self._sync_tag_loras(tag_loras)
        context, added = self._conditioning(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, n_prompts,
                                           num_images, cfg, prompt_options, (height, width),
                                           image_mode=image is not None)
        timer.lap("encode_prompt")

        start_state = self._prepare_latents(init_image, image_latents, mask_px, latents, noise, shape, sched, schedule,
                                            start, strength, cfg, add_noise)
        timer.lap("prepare_latents")

        total = len(schedule.timesteps) - start
        on_step = None if progress is None else (lambda i: progress(i - start + 1, total))
        controlled = {} if control is None else {"control": ControlResiduals(
            self.controlnets, control, batch, cfg, start, total, self.device, self.dtype)}
        x = self.denoiser(self.unet, sched, schedule, start_state.latents, context, guidance, start,
                          start_state.step_noise, condition=start_state.condition, blend=start_state.blend,
                          on_step=on_step, added=added, **controlled)
        if not torch.isfinite(x).all():
            raise NumericalError(f"the final latents hold NaN or inf ({self._run_name()}); {self._nan_advice('loop')}")
        timer.lap("denoise")

        images: Any = x
        if output != "latent":
            keep = None if start_state.blend is None else (mask_px, init_image)
            images = self._decode(x, output, keep)
            timer.lap("decode")
        return GenerationResult(images=images, latents=x, seeds=noise.seeds, timings=timer.finish())

    def default_strength(self, inpainting: bool) -> float:
        """What an unset strength means for this model: diffusers' default for the mode."""
        return strength_or_default(None, inpainting=inpainting)

    def load_textual_inversion(self, path: Union[str, Path], token: Optional[str] = None) -> str:
        """Load an embedding file (A1111 .pt/.safetensors, kohya, diffusers learned_embeds; see
        `sdrt.textual_inversion`) so prompts can use its token; returns the token (default: the file's own
        for diffusers files, else the file's stem). Torch backend only."""
        _check_path("path", path)
        return load_textual_inversion(self.text_encoder, self.embedding_tokens, path, token, self.backend)

    def warmup(self, height: Optional[int] = None, width: Optional[int] = None, num_images: int = 1, *,
               steps: int = 30, scheduler: Optional[str] = "ddim", guidance_scale: float = 7.5, eta: float = 0.0,
               num_prompts: int = 1) -> dict[str, float]:
        """Run one throwaway generation of this shape, so that kernels compile and autotune and, with CUDA
        graphs, the denoising loop (and the backend's text encoder / VAE graphs) is captured now rather
        than on the first real call. The graph key also holds steps, scheduler, eta and guidance on/off
        (guidance_scale > 1): warm up with the settings you will use. Returns that run's timings."""
        num_prompts = check_positive_int("num_prompts", num_prompts)
        result = self([""] * num_prompts, steps=steps, guidance_scale=guidance_scale, scheduler=scheduler, eta=eta,
                      height=height, width=width, num_images=num_images, seed=0, output="np")
        return result.timings

    # -- argument handling
    def _run_name(self) -> str:
        return f"{self.backend} backend, {str(self.dtype).removeprefix('torch.')}"

    def _nan_advice(self, stage: str) -> str:
        """What to try after NaN/inf in `stage` ("loop" | "vae"), as fits this run's dtype and backend."""
        if self.dtype != torch.float32:
            advice = f"{str(self.dtype).removeprefix('torch.')} may overflow here: try dtype='float32'"
        elif stage == "vae":
            advice = "the run was already float32, so the VAE weights or the latents hold extreme values"
        else:
            advice = ("the run was already float32: try another scheduler or fewer steps, and check the model's "
                      "weights and any latents or prompt_embeds passed in")
        if self.backend != "torch":
            advice += f"; compare this backend with the reference: sdrt check --backend {self.backend}"
        return advice

    def _image_size(self, init_image: Optional[torch.Tensor], image_latents: Optional[torch.Tensor]) -> tuple[int, int]:
        """(height, width) in pixels of the image given: pixels, or latents (their size x the VAE factor)."""
        if init_image is not None:
            return tuple(init_image.shape[-2:])
        return tuple(side * self.vae_scale_factor for side in image_latents.shape[-2:])

    def _size(self, height, width, image_size: Optional[tuple[int, int]]) -> tuple[int, int]:
        multiple = max(8, self.vae_scale_factor)
        if image_size is not None:
            ih, iw = image_size
            for name, want, got in (("height", height, ih), ("width", width, iw)):
                if want is not None and want != got:
                    raise InvalidInputError(f"{name}={want} differs from the image's {name} {got}; "
                                            f"leave it unset or resize the image")
            try:
                size = check_size("image height", ih, multiple), check_size("image width", iw, multiple)
            except InvalidInputError as e:
                raise InvalidInputError(f"{e} (image size {iw}x{ih})") from None
            check_pixels(*size, self.limits, "the image's size")
            return size
        native_h, native_w = self.native_size
        size = (check_size("height", native_h if height is None else height, multiple),
                check_size("width", native_w if width is None else width, multiple))
        check_pixels(*size, self.limits)
        return size

    def _count_prompts(self, prompt, prompt_embeds) -> int:
        if prompt_embeds is not None:
            if prompt is not None:
                raise InvalidInputError("pass either prompt or prompt_embeds, not both")
            width = self.unet.config.cross_attention_dim
            if not torch.is_tensor(prompt_embeds) or prompt_embeds.dim() != 3 or prompt_embeds.shape[0] < 1 \
                    or prompt_embeds.shape[-1] != width:
                got = list(prompt_embeds.shape) if torch.is_tensor(prompt_embeds) else type(prompt_embeds).__name__
                raise InvalidInputError(f"prompt_embeds must be a tensor [batch >= 1, 77, {width}], got {got}")
            _check_tensor("prompt_embeds", prompt_embeds)
            return prompt_embeds.shape[0]
        if prompt is None:
            raise InvalidInputError("prompt is required (a string or a list of strings), or pass prompt_embeds")
        return len(_text_list("prompt", prompt))

    def _prompt_options(self, clip_skip, prompt_chunking, emphasis) -> PromptOptions:
        options = check_prompt_options(prompt_chunking, emphasis, clip_skip, self.text_layers)
        if options.clip_skip and not isinstance(self.text_encoder, CLIPTextModel):
            raise InvalidInputError(f"clip_skip needs the torch backend (the {self.backend} backend's text encoder "
                                    f"returns only the last layer)")
        return options

    # -- stages
    def _conditioning(self, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, n_prompts: int,
                      num_images: int, cfg: bool, options: PromptOptions, size: tuple[int, int], image_mode: bool):
        """-> (the context, the U-Net's added inputs batched as it or None: SDXL's text_embeds and time_ids)."""
        return self._context(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, n_prompts, num_images,
                             cfg, options), None

    def _context(self, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, n_prompts: int,
                 num_images: int, cfg: bool, options: PromptOptions) -> torch.Tensor:
        """[B, 77k, D], or [2B, 77k, D] = [uncond; cond] under CFG, each prompt repeated num_images times;
        k chunks of 77 (`sdrt.prompt_encoding`), one k for prompts and negatives."""
        texts = _text_list("prompt", prompt) if prompt_embeds is None else None
        negatives = negative_texts(negative_prompt, n_prompts) if cfg and negative_prompt_embeds is None else None
        min_chunks = min_chunk_count(prompt_embeds, self.tokenizer)
        cond, uncond = encode_prompt_pair(self.text_encoder, self.tokenizer, texts, negatives, options,
                                          self.embedding_tokens, self.device, min_chunks)
        cond = (prompt_embeds if cond is None else cond).to(self.device, self.dtype)
        if not cfg:
            return cond.repeat_interleave(num_images, dim=0)
        if negative_prompt_embeds is not None:
            if negative_prompt_embeds.shape != cond.shape:
                raise InvalidInputError(f"negative_prompt_embeds must be a tensor of prompt_embeds' shape "
                                        f"{list(cond.shape)}")
            uncond = negative_prompt_embeds
        else:
            if uncond.shape[1:] != cond.shape[1:]:
                raise InvalidInputError(f"prompt_embeds have {cond.shape[1]} tokens but the negative prompt encodes "
                                        f"to {uncond.shape[1]}: pass negative_prompt_embeds of prompt_embeds' shape")
        uncond = uncond.to(self.device, self.dtype)
        return torch.cat([uncond.repeat_interleave(num_images, dim=0), cond.repeat_interleave(num_images, dim=0)])

    def _timesteps(self, sched, steps: int, strength: float, image_mode: bool) -> tuple[Any, int, bool]:
        """-> (the schedule, the start index, whether the start noises the image latents: always here; SDXL's
        denoising_start starts from them as they are)."""
        return (sched.set_timesteps(steps, device=self.device, strength=strength), sched.start_index(steps, strength),
                True)

    def _prepare_latents(self, init_image, image_latents, mask_px, latents, noise: NoiseSource, shape, sched, schedule,
                         start: int, strength: float, cfg: bool, add_noise: bool = True) -> "_StartState":
        """The loop's start: txt2img noise, img2img's noised image latents (or given latents), or inpainting's
        latents with its 9-channel condition or 4-channel blend; and every step's noise, drawn in diffusers'
        order. add_noise=False: the image latents are the start as they are (no start noise drawn for img2img)."""
        x_noise = None if latents is None else latents.detach().to("cpu", torch.float32)
        condition = blend = None
        if init_image is None and image_latents is None:
            x_noise = noise.randn(shape) if x_noise is None else x_noise
            x = x_noise.to(self.device) * schedule.init_noise_sigma
        elif mask_px is None:
            if image_latents is None:
                image_latents = self._encode_image(init_image * 2 - 1, noise.img2img_encode_noise(shape))
            image_latents = image_latents.to(self.device).expand(shape)
            if add_noise:
                x_noise = noise.randn(shape) if x_noise is None else x_noise
                x = sched.add_noise(image_latents, x_noise.to(self.device), start, schedule)
            else:
                x = image_latents.contiguous()
        else:
            x, condition, blend = self._prepare_inpaint(init_image, mask_px, x_noise, noise, shape, sched, schedule,
                                                        start, strength, cfg, add_noise)
        step_noise = [None if n is None else n.to(self.device)
                      for n in noise.step_noise(schedule.noise_steps, start, shape)]
        return _StartState(x, step_noise, condition, blend)

    def _decode(self, latents: torch.Tensor, output: str, keep=None):
        """Final latents -> images as `output` asks. keep: (mask [1,1,H,W], image [1,3,H,W]) whose unmasked
        pixels are pasted back exactly (4-channel inpainting)."""
        decoded = self.vae_precision.decode(latents / self.vae.scaling_factor)
        if not torch.isfinite(decoded).all():
            raise NumericalError(f"the VAE decoded NaN or inf ({self._run_name()}); {self._nan_advice('vae')}")
        pixels = imgs.to_unit_range(decoded)
        if keep is not None:  # sdrt's addition: the unmasked pixels are exactly the input's
            mask_px, init_image = keep
            pixels = mask_px * pixels + (1 - mask_px) * init_image
        images = imgs.to_numpy(pixels)
        return imgs.to_pil(images) if output == "pil" else images

    def _encode_image(self, pixels: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """pixels [1, 3, H, W] in [-1, 1]; eps [n, 4, h, w] -> sampled latents [n, 4, h, w] float32, scaled."""
        mean, logvar = self.vae_precision.encode(pixels.to(self.device))
        sample = mean.float() + torch.exp(0.5 * logvar.float()) * eps.to(self.device)
        return sample * self.vae.scaling_factor

    def _prepare_inpaint(self, init_image, mask_px, x_noise, noise: NoiseSource, shape, sched, schedule, start: int,
                         strength: float, cfg: bool, add_noise: bool = True):
        """-> (start latents, 9-channel U-Net condition or None, 4-channel LatentBlend or None), drawing from
        the generators in diffusers' order: image latents (when used), start noise, masked-image latents.
        add_noise=False: the start is the image latents (the noise is still drawn, for the blend)."""
        batch, lat_shape = shape[0], (1, *shape[1:])
        full_strength = strength == 1.0
        image_latents = None
        if not self.is_inpainting_model or not full_strength or not add_noise:
            image_latents = self._encode_image(init_image * 2 - 1, noise.randn_first(lat_shape)).expand(shape)
        x_noise = noise.randn(shape) if x_noise is None else x_noise
        x_noise = x_noise.to(self.device)
        if not add_noise:
            x = image_latents.contiguous()
        elif full_strength:
            x = x_noise * schedule.init_noise_sigma
        else:
            x = sched.add_noise(image_latents, x_noise, start, schedule)
        mask_lat = F.interpolate(mask_px, size=shape[-2:]).to(self.device).expand(batch, 1, *shape[-2:])
        masked_eps = noise.randn_first(lat_shape)
        if not self.is_inpainting_model:
            # diffusers also encodes the masked image here (unused by a 4-channel U-Net); masked_eps keeps
            # the generator where it leaves it, so later step noise matches
            return x, None, LatentBlend(mask_lat, image_latents.contiguous(), x_noise)
        masked_latents = self._encode_image((init_image * 2 - 1) * (mask_px < 0.5), masked_eps).expand(shape)
        condition = torch.cat([mask_lat, masked_latents], dim=1)
        return x, torch.cat([condition, condition]) if cfg else condition, None


@dataclass
class _StartState:
    """What the denoising loop starts from."""

    latents: torch.Tensor                     # [B, 4, h, w] float32 at the start index
    step_noise: list[Optional[torch.Tensor]]  # the noise each step takes, or None
    condition: Optional[torch.Tensor]         # 9-channel inpainting: [mask, masked-image latents], CFG-batched
    blend: Optional[LatentBlend]              # 4-channel inpainting: the region kept from the image


class _PhaseTimer:
    """Seconds per phase; on CUDA it waits for the device at each phase boundary (never inside the loop)."""

    def __init__(self, device: torch.device):
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.begin = self.last = time.perf_counter()
        self.timings: dict[str, float] = {}

    def lap(self, name: str) -> None:
        self.sync()
        now = time.perf_counter()
        self.timings[name] = now - self.last
        self.last = now

    def finish(self) -> dict[str, float]:
        self.timings["total"] = time.perf_counter() - self.begin
        return self.timings

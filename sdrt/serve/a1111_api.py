"""AUTOMATIC1111's `/sdapi/v1/txt2img` and `/sdapi/v1/img2img`: request models, translation to a job, responses.

Semantics follow AUTOMATIC1111's modules/api/api.py and modules/processing.py: every field may be null (=
its default); unknown fields are ignored; seed -1 is a random seed; batch_size x n_iter images get the seeds
seed, seed+1, ...; `info` is a JSON string with `seed`, `all_seeds`, `all_prompts`, `infotexts`, ...;
`parameters` echoes the request. Where sdrt differs: the same seed gives the same image in sdrt, not
AUTOMATIC1111's image (its seed -> noise differs from diffusers', which sdrt follows); width/height default
to the model's native size; features that would change the picture and sdrt lacks (hires fix, face
restoration, tiling, variation seeds, styles, scripts, clip skip) are refused with a 422 naming the field;
the inpainting options mask_blur, inpainting_fill, inpaint_full_res(_padding) and initial_noise_multiplier
are ignored (sdrt inpaints the whole picture as diffusers does).
"""
from __future__ import annotations

import hashlib
import json
import random
import time
from dataclasses import dataclass
from typing import Any, Optional

import PIL.Image
import PIL.ImageOps
from pydantic import BaseModel, ConfigDict, Field, field_validator

from sdrt import __version__
from sdrt.errors import InvalidInputError
from sdrt.seeds import SEED_LIMIT
from sdrt.serve.codec import decode_base64_image
from sdrt.serve.jobs import GenerationJob
from sdrt.serve.loras import parse_lora_tags
from sdrt.serve.rejections import Rejected
from sdrt.serve.settings import ServeSettings

# AUTOMATIC1111 sampler name -> (sdrt scheduler, AUTOMATIC1111's aliases); only what sdrt serves
SAMPLERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "Euler a": ("euler_a", ("k_euler_a", "k_euler_ancestral")),
    "Euler": ("euler", ("k_euler",)),
    "DPM++ 2M": ("dpmpp_2m", ("k_dpmpp_2m",)),
    "DPM++ 2M Karras": ("dpmpp_2m_karras", ("k_dpmpp_2m_ka",)),
    "DDIM": ("ddim", ()),
    "LCM": ("lcm", ("k_lcm",)),
    "DDPM": ("ddpm", ()),  # sdrt's own: AUTOMATIC1111 has no DDPM sampler
}
DEFAULT_SAMPLER = "Euler"  # AUTOMATIC1111's API default (sampler_index)
AUTOMATIC = ("automatic", "")  # the `scheduler` (schedule type) values meaning "the sampler's own"
KARRAS = "karras"
RANDOM_SEED_LIMIT = 4294967294  # AUTOMATIC1111 draws seed -1 from range(4294967294)
UNSUPPORTED_OVERRIDES = {"CLIP_stop_at_last_layers": 1}  # option -> the only value sdrt serves


def _sampler_lookup() -> dict[str, str]:
    names = {name.lower(): name for name in SAMPLERS}
    for name, (_, aliases) in SAMPLERS.items():
        names.update({alias.lower(): name for alias in aliases})
    return names


_SAMPLER_NAMES = _sampler_lookup()


def _off(name: str, what: str):
    """A validator refusing a truthy value of a feature sdrt does not have."""
    def check(cls, value):
        if value:
            raise ValueError(f"{what} is not supported by sdrt serve")
        return value
    return field_validator(name)(classmethod(check))


class _Generation(BaseModel):
    model_config = ConfigDict(extra="ignore")

    prompt: Optional[str] = ""
    negative_prompt: Optional[str] = ""
    seed: Optional[int] = Field(-1, ge=-1, lt=SEED_LIMIT)
    sampler_name: Optional[str] = None
    sampler_index: Optional[str] = None
    scheduler: Optional[str] = None
    batch_size: Optional[int] = Field(1, ge=1)
    n_iter: Optional[int] = Field(1, ge=1)
    steps: Optional[int] = Field(50, ge=1)
    cfg_scale: Optional[float] = Field(7.0, ge=0, allow_inf_nan=False)
    width: Optional[int] = Field(None, ge=8, le=4096, multiple_of=8)
    height: Optional[int] = Field(None, ge=8, le=4096, multiple_of=8)
    eta: Optional[float] = Field(None, ge=0, allow_inf_nan=False)
    subseed: Optional[int] = -1
    subseed_strength: Optional[float] = 0.0
    seed_resize_from_h: Optional[int] = -1
    seed_resize_from_w: Optional[int] = -1
    styles: Optional[list[str]] = None
    restore_faces: Optional[bool] = None
    tiling: Optional[bool] = None
    override_settings: Optional[dict[str, Any]] = None
    script_name: Optional[str] = None
    alwayson_scripts: Optional[dict[str, Any]] = None
    send_images: Optional[bool] = True
    save_images: Optional[bool] = False  # accepted; sdrt serve never writes files

    refuse_variation = _off("subseed_strength", "a variation seed (subseed_strength > 0)")
    refuse_styles = _off("styles", "prompt styles")
    refuse_faces = _off("restore_faces", "face restoration")
    refuse_tiling = _off("tiling", "tiling")
    refuse_scripts = _off("script_name", "scripts")
    refuse_alwayson = _off("alwayson_scripts", "always-on scripts")

    @field_validator("sampler_name", "sampler_index")
    @classmethod
    def _known_sampler(cls, value):
        if value is not None and value.lower() not in _SAMPLER_NAMES:
            raise ValueError(f"sdrt serves the samplers {', '.join(SAMPLERS)}; got {value!r}")
        return value

    @field_validator("seed_resize_from_h", "seed_resize_from_w")
    @classmethod
    def _no_seed_resize(cls, value):
        if value is not None and value > 0:
            raise ValueError("seed resizing is not supported by sdrt serve")
        return value


class Txt2ImgRequest(_Generation):
    enable_hr: Optional[bool] = False
    denoising_strength: Optional[float] = None  # the hires fix's; unused

    refuse_hires = _off("enable_hr", "the hires fix (enable_hr)")


class Img2ImgRequest(_Generation):
    init_images: Optional[list[str]] = None
    mask: Optional[str] = None
    denoising_strength: Optional[float] = Field(0.75, ge=0, le=1)
    resize_mode: Optional[int] = 0
    inpainting_mask_invert: Optional[int] = Field(0, ge=0, le=1)
    include_init_images: Optional[bool] = False

    @field_validator("resize_mode")
    @classmethod
    def _just_resize(cls, value):
        if value not in (None, 0):
            raise ValueError("sdrt serves resize_mode 0 (just resize) only")
        return value


class GenerationResponse(BaseModel):
    images: list[str]
    parameters: dict[str, Any]
    info: str


@dataclass(frozen=True)
class Translated:
    """A request as a job, with what its answer reports."""
    job: GenerationJob
    sampler: str    # the AUTOMATIC1111 name
    prompt: str     # as sent, tags included (as AUTOMATIC1111 reports it)


def resolve_sampler(sampler: Optional[str], schedule: Optional[str]) -> tuple[str, str]:
    """(AUTOMATIC1111 sampler name, sdrt scheduler) for sampler_name (or sampler_index) and scheduler."""
    name = _SAMPLER_NAMES[(sampler or DEFAULT_SAMPLER).lower()]
    schedule = (schedule or "").lower()
    if schedule in AUTOMATIC:
        return name, SAMPLERS[name][0]
    if schedule == KARRAS and name in ("DPM++ 2M", "DPM++ 2M Karras"):
        return "DPM++ 2M Karras", "dpmpp_2m_karras"
    raise Rejected("scheduler", f"sdrt serves the schedule type 'automatic' (and 'karras' with DPM++ 2M); "
                                f"got {schedule!r} for {name!r}", value=schedule)


def _eta(sdrt_scheduler: str, eta: Optional[float]) -> float:
    """AUTOMATIC1111 applies eta to DDIM (default 0) and the ancestral samplers (default 1)."""
    if sdrt_scheduler == "ddim":
        return 0.0 if eta is None else float(eta)
    if sdrt_scheduler == "euler_a" and eta not in (None, 1.0):
        raise Rejected("eta", f"sdrt's Euler a is ancestral with eta 1 (as diffusers'); got {eta}", value=eta)
    return 0.0


def _seeds(seed: Optional[int], count: int) -> tuple[int, ...]:
    first = random.randrange(RANDOM_SEED_LIMIT) if seed in (None, -1) else seed
    if first + count > SEED_LIMIT:
        raise Rejected("seed", f"seed + images must stay below 2**64, got seed {first} for {count} images",
                       value=seed)
    return tuple(first + i for i in range(count))


def _check_model(req: _Generation, settings: ServeSettings) -> None:
    overrides = req.override_settings or {}
    wanted = overrides.get("sd_model_checkpoint")
    if wanted not in (None, "", settings.model.name):
        raise Rejected("override_settings.sd_model_checkpoint",
                       f"unknown model {wanted!r}; this server serves {settings.model.name!r}", value=wanted)
    for option, only in UNSUPPORTED_OVERRIDES.items():
        if overrides.get(option) not in (None, only):
            raise Rejected(f"override_settings.{option}", f"sdrt serve supports only {only}",
                           value=overrides[option])


def _common(req: _Generation, settings: ServeSettings, mode: str, width: int, height: int) -> dict:
    limits = settings.limits
    if width * height > limits.max_pixels:
        raise Rejected("width", f"width x height is {width * height} pixels, over the server's {limits.max_pixels}",
                       value=width)
    steps = 50 if req.steps is None else req.steps
    if steps > limits.max_steps:
        raise Rejected("steps", f"at most {limits.max_steps} on this server, got {steps}", value=steps)
    count = (req.batch_size or 1) * (req.n_iter or 1)
    if count > limits.max_images:
        raise Rejected("batch_size", f"batch_size x n_iter is {count} images, over the server's {limits.max_images}",
                       value=req.batch_size)
    _check_model(req, settings)
    sampler, scheduler = resolve_sampler(req.sampler_name or req.sampler_index, req.scheduler)
    try:
        prompt, loras = parse_lora_tags(req.prompt or "")
        settings.model.loras.check(loras)
    except InvalidInputError as e:
        raise Rejected("prompt", str(e), value=req.prompt) from None
    job = dict(mode=mode, prompt=prompt, negative_prompt=req.negative_prompt or "", seeds=_seeds(req.seed, count),
               guidance_scale=7.0 if req.cfg_scale is None else req.cfg_scale, steps=steps, scheduler=scheduler,
               eta=_eta(scheduler, req.eta), width=width, height=height, loras=loras)
    return {"job": job, "sampler": sampler}


def txt2img_job(req: Txt2ImgRequest, settings: ServeSettings) -> Translated:
    model = settings.model
    if model.inpainting:
        raise Rejected(None, f"{model.name} is an inpainting model: use /sdapi/v1/img2img with init_images and mask")
    height, width = model.native_size
    common = _common(req, settings, "txt2img", req.width or width, req.height or height)
    return Translated(GenerationJob(**common["job"]), common["sampler"], req.prompt or "")


def img2img_job(req: Img2ImgRequest, settings: ServeSettings) -> Translated:
    """Decodes and resizes the pictures: blocking work, run it off the event loop."""
    limits, model = settings.limits, settings.model
    if not req.init_images or len(req.init_images) != 1:
        raise Rejected("init_images", "must hold exactly one base64 image", value=None)
    if model.inpainting and not req.mask:
        raise Rejected("mask", f"{model.name} is an inpainting model: pass a mask")
    image = decode_base64_image(req.init_images[0], "init_images", max_bytes=limits.max_body_bytes,
                                max_pixels=limits.max_input_pixels)
    width, height = req.width or image.width, req.height or image.height
    for name, value in (("width", width), ("height", height)):
        if value % model.size_multiple:
            raise Rejected(name, f"must be a multiple of {model.size_multiple}, got {value} (the image's size when "
                                 f"unset: pass width and height to resize it)", value=value)
    common = _common(req, settings, "inpaint" if req.mask else "img2img", width, height)
    image = _resized(image.convert("RGB"), width, height)
    mask = None
    if req.mask:
        mask = _mask(decode_base64_image(req.mask, "mask", max_bytes=limits.max_body_bytes,
                                         max_pixels=limits.max_input_pixels), bool(req.inpainting_mask_invert))
        mask = _resized(mask, width, height)
    strength = 0.75 if req.denoising_strength is None else req.denoising_strength
    if common["job"]["scheduler"] != "lcm" and int(common["job"]["steps"] * strength) < 1:
        raise Rejected("denoising_strength", f"steps x denoising_strength must leave a step (>= 1), got "
                                             f"{common['job']['steps']} x {strength}", value=strength)
    digest = hashlib.sha256(image.tobytes()).hexdigest()
    job = GenerationJob(**common["job"], strength=strength, image=image, mask=mask, image_digest=digest)
    return Translated(job, common["sampler"], req.prompt or "")


def _resized(image: PIL.Image.Image, width: int, height: int) -> PIL.Image.Image:
    """AUTOMATIC1111's resize_mode 0 ("just resize"): Lanczos to the requested size."""
    return image if image.size == (width, height) else image.resize((width, height), PIL.Image.LANCZOS)


def _mask(mask: PIL.Image.Image, invert: bool) -> PIL.Image.Image:
    """White = repaint. A transparent-background RGBA mask is read from its alpha (AUTOMATIC1111's rule)."""
    if mask.mode == "RGBA" and mask.getextrema()[-1] != (255, 255):
        mask = mask.getchannel("A").point(lambda a: 255 if a > 128 else 0)
    else:
        mask = mask.convert("L")
    return PIL.ImageOps.invert(mask) if invert else mask


def infotext(t: Translated, seed: int, model_name: str, lora_hashes: str = "") -> str:
    """AUTOMATIC1111's per-image parameters text (also written into each PNG); lora_hashes: the value of its
    `Lora hashes` entry for the prompt's <lora:...> tags (`LoraLibrary.hash_list`)."""
    job = t.job
    negative = f"\nNegative prompt: {job.negative_prompt}" if job.negative_prompt else ""
    params = {"Steps": job.steps, "Sampler": t.sampler, "CFG scale": job.guidance_scale, "Seed": seed,
              "Size": f"{job.width}x{job.height}", "Model": model_name, "Denoising strength": job.strength,
              "Lora hashes": f'"{lora_hashes}"' if lora_hashes else None, "Version": f"sdrt {__version__}"}
    listed = ", ".join(f"{k}: {v}" for k, v in params.items() if v is not None)
    return f"{t.prompt}{negative}\n{listed}"


def info_json(t: Translated, req: _Generation, model_name: str, inpainting_model: bool, lora_hashes: str = "") -> str:
    job, n = t.job, t.job.num_images
    return json.dumps({
        "prompt": t.prompt, "all_prompts": [t.prompt] * n,
        "negative_prompt": job.negative_prompt, "all_negative_prompts": [job.negative_prompt] * n,
        "seed": job.seeds[0], "all_seeds": list(job.seeds),
        "subseed": -1, "all_subseeds": [-1] * n, "subseed_strength": 0,
        "width": job.width, "height": job.height, "sampler_name": t.sampler, "cfg_scale": job.guidance_scale,
        "steps": job.steps, "batch_size": req.batch_size or 1, "restore_faces": False, "face_restoration_model": None,
        "sd_model_name": model_name, "sd_model_hash": None, "sd_vae_name": None, "sd_vae_hash": None,
        "seed_resize_from_w": -1, "seed_resize_from_h": -1, "denoising_strength": job.strength,
        "extra_generation_params": {}, "index_of_first_image": 0,
        "infotexts": [infotext(t, seed, model_name, lora_hashes) for seed in job.seeds], "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S"), "clip_skip": 1,
        "is_using_inpainting_conditioning": inpainting_model and job.mode == "inpaint",
    })


def echoed_parameters(req: _Generation) -> dict[str, Any]:
    """The request as AUTOMATIC1111 echoes it: its fields, init images and mask only when asked for."""
    params = req.model_dump()
    if isinstance(req, Img2ImgRequest) and not req.include_init_images:
        params.update(init_images=None, mask=None)
    return params

"""OpenAI's `POST /v1/images/generations`: request model, translation to a job, response.

OpenAI's fields: prompt, n, size ("WxH" or "auto" = the model's native size), model (None or this server's
model name), response_format ("b64_json" only: this server keeps no files to link to), output_format
("png"). Other OpenAI fields (quality, style, user, background, ...) are ignored. sdrt's extensions, sent
by clients as extra body fields: negative_prompt, seed (images get seed, seed+1, ...; none: random),
steps, guidance_scale, scheduler (an sdrt scheduler name).
"""
from __future__ import annotations

import random
import re
import time
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator

from sdrt.errors import InvalidInputError
from sdrt.schedulers import SCHEDULER_NAMES
from sdrt.seeds import SEED_LIMIT
from sdrt.serve.jobs import GenerationJob
from sdrt.serve.loras import parse_lora_tags
from sdrt.serve.rejections import Rejected
from sdrt.serve.settings import ServeSettings

SIZE = re.compile(r"^(\d+)x(\d+)$")
DEFAULT_STEPS, DEFAULT_GUIDANCE, DEFAULT_SCHEDULER = 30, 7.5, "ddim"  # sdrt's own defaults


class ImageGenerationRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())

    prompt: str = Field(min_length=1)
    model: Optional[str] = None
    n: Optional[int] = Field(1, ge=1)
    size: Optional[str] = None
    response_format: Optional[str] = None
    output_format: Optional[str] = None
    stream: Optional[bool] = False
    negative_prompt: Optional[str] = None
    seed: Optional[int] = Field(None, ge=0, lt=SEED_LIMIT)
    steps: Optional[int] = Field(None, ge=1)
    guidance_scale: Optional[float] = Field(None, ge=0, allow_inf_nan=False)
    scheduler: Optional[str] = None

    @field_validator("response_format")
    @classmethod
    def _b64_only(cls, value):
        if value not in (None, "b64_json"):
            raise ValueError("sdrt serve answers with response_format 'b64_json' only (it keeps no files to link)")
        return value

    @field_validator("output_format")
    @classmethod
    def _png_only(cls, value):
        if value not in (None, "png"):
            raise ValueError("sdrt serve writes output_format 'png' only")
        return value

    @field_validator("stream")
    @classmethod
    def _no_stream(cls, value):
        if value:
            raise ValueError("streaming is not supported by sdrt serve")
        return value

    @field_validator("scheduler")
    @classmethod
    def _known_scheduler(cls, value):
        if value is not None and value not in SCHEDULER_NAMES:
            raise ValueError(f"scheduler must be one of {', '.join(SCHEDULER_NAMES)}, got {value!r}")
        return value


def _size(size: Optional[str], settings: ServeSettings) -> tuple[int, int]:
    """(width, height)."""
    model = settings.model
    if size in (None, "auto"):
        height, width = model.native_size
        return width, height
    match = SIZE.match(size)
    if not match:
        raise Rejected("size", f"must be WIDTHxHEIGHT (e.g. 512x512) or 'auto', got {size!r}", value=size)
    width, height = int(match.group(1)), int(match.group(2))
    if width % model.size_multiple or height % model.size_multiple or not 8 <= min(width, height) \
            or max(width, height) > 4096:
        raise Rejected("size", f"width and height must be multiples of {model.size_multiple} in [8, 4096], "
                               f"got {size!r}", value=size)
    if width * height > settings.limits.max_pixels:
        raise Rejected("size", f"{width * height} pixels, over the server's {settings.limits.max_pixels}", value=size)
    return width, height


def generation_job(req: ImageGenerationRequest, settings: ServeSettings) -> GenerationJob:
    limits, model = settings.limits, settings.model
    if req.model not in (None, model.name):
        raise Rejected("model", f"unknown model {req.model!r}; this server serves {model.name!r}", value=req.model)
    if model.inpainting:
        raise Rejected("model", f"{model.name} is an inpainting model: it cannot generate from text alone")
    n = req.n or 1
    if n > limits.max_images:
        raise Rejected("n", f"at most {limits.max_images} images per request on this server, got {n}", value=n)
    steps = req.steps or DEFAULT_STEPS
    if steps > limits.max_steps:
        raise Rejected("steps", f"at most {limits.max_steps} on this server, got {steps}", value=steps)
    width, height = _size(req.size, settings)
    first = random.randrange(2**32) if req.seed is None else req.seed
    if first + n > SEED_LIMIT:
        raise Rejected("seed", f"seed + n must stay below 2**64, got {first} + {n}", value=req.seed)
    try:
        prompt, loras = parse_lora_tags(req.prompt)
        model.loras.check(loras)
    except InvalidInputError as e:
        raise Rejected("prompt", str(e), value=req.prompt) from None
    return GenerationJob(
        mode="txt2img", prompt=prompt, negative_prompt=req.negative_prompt or "",
        seeds=tuple(first + i for i in range(n)),
        guidance_scale=DEFAULT_GUIDANCE if req.guidance_scale is None else req.guidance_scale,
        steps=steps, scheduler=req.scheduler or DEFAULT_SCHEDULER, eta=0.0, width=width, height=height, loras=loras)


def images_response(job: GenerationJob, images_b64: list[str]) -> dict[str, Any]:
    return {"created": int(time.time()), "data": [{"b64_json": b64} for b64 in images_b64],
            "output_format": "png", "size": f"{job.width}x{job.height}"}


def error_body(message: str, param: Optional[str] = None, kind: str = "invalid_request_error",
               code: Optional[str] = None) -> dict[str, Any]:
    """OpenAI's error shape, which its clients parse."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}

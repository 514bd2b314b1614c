"""One request's generation, independent of the API it came through, and which jobs may share a batch.

A job's images are drawn from one generator per image (its seeds), so an image depends on its own seed and
settings only, never on the other images of the batch it runs in; `run_batch` keeps the arithmetic
batch-invariant too. What one pipeline call must share is in `batch_key`: guidance scale and seed are the
only settings that may differ per sample.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Hashable, Optional

import PIL.Image

from sdrt.guidance import uses_cfg
from sdrt.prompt_encoding import surely_one_chunk

MODES = ("txt2img", "img2img", "inpaint")


@dataclass(frozen=True)
class GenerationJob:
    mode: str                      # "txt2img" | "img2img" | "inpaint"
    prompt: str                    # without its <lora:...> tags
    negative_prompt: str
    seeds: tuple[int, ...]         # one per image
    guidance_scale: float
    steps: int
    scheduler: str                 # an sdrt scheduler name
    eta: float
    width: int
    height: int
    loras: tuple[tuple[str, float], ...] = ()   # (name, weight), sorted by name
    strength: Optional[float] = None            # img2img / inpainting
    # the input picture, already at width x height (RGB), and the mask (L, white = repaint)
    image: Optional[PIL.Image.Image] = field(default=None, compare=False, repr=False)
    mask: Optional[PIL.Image.Image] = field(default=None, compare=False, repr=False)
    image_digest: Optional[str] = None          # identifies the picture: img2img jobs share only the same one

    @property
    def num_images(self) -> int:
        return len(self.seeds)


def batch_key(job: GenerationJob) -> Optional[Hashable]:
    """Jobs with equal keys can run as one pipeline call; None: the job runs alone.

    Shared per call: mode, size, steps, scheduler and eta, guidance on/off (a scale > 1 adds the
    unconditional half), the LoRA set (fused into the weights), and for img2img the picture and strength
    (the pipeline takes one input image). Inpainting always runs alone, one image per call: the pipeline
    encodes its input with the first image's generator, which would tie an image to its batch's first seed.
    A prompt or negative prompt that may need more than one 75-token chunk runs alone too."""
    if job.mode == "inpaint":
        return None
    if not (surely_one_chunk(job.prompt) and surely_one_chunk(job.negative_prompt)):
        return None  # a batch shares one chunk count: padding a prompt with empty chunks would change its picture
    key = (job.mode, job.width, job.height, job.steps, job.scheduler, job.eta, uses_cfg(job.guidance_scale),
           job.loras)
    if job.mode == "img2img":
        key += (job.image_digest, job.strength)
    return key


def split_job(job: GenerationJob, max_images: int) -> list[GenerationJob]:
    """The job as pieces of at most `max_images` images (one image each for inpainting); images and
    their order are unchanged, since each image has its own seed."""
    size = 1 if job.mode == "inpaint" else max_images
    if job.num_images <= size:
        return [job]
    return [dataclasses.replace(job, seeds=job.seeds[i:i + size]) for i in range(0, job.num_images, size)]

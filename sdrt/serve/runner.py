"""Run one batch of jobs as one pipeline call: `run_batch(pipe, jobs) -> one image list per job`.

Pure and reusable outside sdrt's own queue (e.g. under a Ray Serve `@serve.batch` method): the caller
groups jobs by `batch_key` and runs batches one at a time on one pipeline.

Batch invariance: a job's images are bitwise the same whatever batch it runs in. The noise is per image
(one generator per seed), guidance is per sample, and on the CPU the convolutions run on ATen's own
per-sample kernels (oneDNN and NNPACK pick their algorithm by batch size, which changes the last bits).
On CUDA, cuDNN and cuBLAS choose algorithms by shape, so there an image may differ in its last bits with
the batch it ran in.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional, Sequence

import PIL.Image
import torch

from sdrt.errors import InvalidInputError
from sdrt.serve.jobs import GenerationJob, batch_key
from sdrt.serve.loras import LoraLibrary


@contextlib.contextmanager
def batch_invariant_kernels(device: torch.device) -> Iterator[None]:
    """On the CPU: convolutions on ATen's per-sample kernels for the enclosed calls (process-wide flags,
    so the pipeline's thread must be the only one running torch meanwhile)."""
    if torch.device(device).type != "cpu":
        yield
        return
    mkldnn = torch.backends.mkldnn.set_flags(False)[0]
    nnpack = torch.backends.nnpack.set_flags(False)[0]
    try:
        yield
    finally:
        torch.backends.mkldnn.set_flags(mkldnn)
        torch.backends.nnpack.set_flags(nnpack)


def run_batch(pipe: Any, jobs: Sequence[GenerationJob],
              loras: Optional[LoraLibrary] = None) -> list[list[PIL.Image.Image]]:
    """Generate every job's images in one call of `pipe` (a `sdrt.Pipeline`). The jobs must share one
    `batch_key` (or be a single job); `loras` syncs the pipeline's fused LoRAs to the jobs' set first."""
    if not jobs:
        return []
    first = jobs[0]
    if len(jobs) > 1 and (batch_key(first) is None or any(batch_key(j) != batch_key(first) for j in jobs[1:])):
        raise InvalidInputError("run_batch: the jobs of one batch must share one batch_key")
    prompts, negatives, seeds, scales = [], [], [], []
    for job in jobs:
        prompts += [job.prompt] * job.num_images
        negatives += [job.negative_prompt] * job.num_images
        seeds += list(job.seeds)
        scales += [job.guidance_scale] * job.num_images
    inputs = {} if first.image is None else {"image": first.image, "mask": first.mask, "strength": first.strength}
    with batch_invariant_kernels(pipe.device):
        if loras is not None:
            loras.sync(pipe, first.loras)
        result = pipe(prompts, negative_prompt=negatives, steps=first.steps, guidance_scale=scales,
                      scheduler=first.scheduler, eta=first.eta, height=first.height, width=first.width,
                      seed=seeds, output="pil", **inputs)
    out, start = [], 0
    for job in jobs:
        out.append(result.images[start:start + job.num_images])
        start += job.num_images
    return out

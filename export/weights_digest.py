"""The identity of a model for the export cache: a sha256 over its configs and every tensor's bytes.

An export holds the weights it was traced with, so a cached export may be reused only by a model with the
same weights. Names, paths and file dates cannot promise that: two in-memory models share a name
(`random:tiny` with seeds 0 and 7), and weights change in place after loading (a fused LoRA). So the key is
the content itself: per tensor, sha256 of its bytes (on the CPU; CUDA tensors are copied one at a time),
then one sha256 over the component names, configs and per-tensor (name, dtype, shape, digest) lines.

Cost: one read of every weight. Tensors are hashed on a thread pool (hashlib releases the GIL), so it
runs at about the cores' combined sha256 rate (with SHA-NI ~1-2 GB/s per core): measured figures are in
the README (Backends).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor

import torch

from sdrt.components import Components

PARTS = ("text_encoder", "unet", "vae", "text_encoder_2")  # those a model has (SDXL: the second encoder)


def tensor_sha256(t: torch.Tensor) -> str:
    data = t.detach().reshape(-1).contiguous().cpu()
    return hashlib.sha256(data.view(torch.uint8).numpy() if data.numel() else b"").hexdigest()


def weights_digest(components: Components, workers: int = 0) -> str:
    """sha256 hex digest of the modules' configs and tensors. workers: hashing threads (0 = the cores)."""
    parts = [p for p in PARTS if getattr(components, p, None) is not None]
    entries = []
    for part in parts:
        module = getattr(components, part)
        entries += [(part, name, t) for name, t in module.state_dict(keep_vars=False).items()]
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        digests = list(pool.map(lambda entry: tensor_sha256(entry[2]), entries))
    h = hashlib.sha256()
    for part in parts:
        config = dataclasses.asdict(getattr(components, part).config)
        h.update(f"{part} {json.dumps(config, sort_keys=True, default=str)}\n".encode())
    for (part, name, t), digest in zip(entries, digests):
        h.update(f"{part}.{name} {str(t.dtype).removeprefix('torch.')} {list(t.shape)} {digest}\n".encode())
    return h.hexdigest()

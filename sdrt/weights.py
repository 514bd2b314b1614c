"""Checkpoint loading: read tensors safely, check them against the module, build on `meta`, assign.

Modules are built on the meta device (no memory, no init) and receive the checkpoint's tensors with
`load_state_dict(assign=True)`; safetensors files are memory-mapped, so loading costs about as much
as reading the file. A tensor at a file offset that is not 64-byte aligned is copied into fresh memory:
the CPU's BLAS and oneDNN kernels round differently on unaligned data, so the same weights from two files
(a diffusers folder and a single file) would otherwise give slightly different pictures. Every failure becomes a ModelLoadError that names the file and, where there is
one, the key.
"""
from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Callable, Mapping, Optional, Union

import torch
from torch import nn

from sdrt.errors import ModelLoadError

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")
ALIGNMENT = 64  # bytes, as torch's CPU allocator aligns
_WEIGHT_NAMES = ("diffusion_pytorch_model", "model")  # diffusers components, transformers models


def read_tensors(path: Union[str, Path]) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint file, on the CPU. safetensors are memory-mapped; pickles are read
    only with `torch.load(weights_only=True)`, which refuses anything but tensors and plain containers."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"missing weights file: {path}")
    if path.suffix in SAFETENSORS_SUFFIXES:
        return _read_safetensors(path)
    if path.suffix in PICKLE_SUFFIXES:
        return _read_pickle(path)
    raise ModelLoadError(f"{path}: unsupported weights format {path.suffix!r} "
                         f"(expected {', '.join(SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES)})")


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {key: f.get_tensor(key) for key in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
        raise ModelLoadError(f"{path}: corrupt or truncated safetensors file ({_first_line(e)})") from None


def _read_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise ModelLoadError(f"{path}: refused: the pickle holds objects other than tensors ({_blocked_global(e)}), "
                             f"and loading it could run arbitrary code; convert it to .safetensors") from None
    except Exception as e:
        raise ModelLoadError(f"{path}: unreadable checkpoint ({_first_line(e)})") from None
    if isinstance(data, Mapping) and isinstance(data.get("state_dict"), Mapping):
        data = data["state_dict"]  # original LDM .ckpt files wrap the weights
    if not isinstance(data, Mapping):
        raise ModelLoadError(f"{path}: expected a dict of tensors, found {type(data).__name__}")
    return {k: v for k, v in data.items() if torch.is_tensor(v)}


def _blocked_global(e: BaseException) -> str:
    """The object torch's weights-only unpickler refused, from its long multi-paragraph message."""
    m = re.search(r"GLOBAL (\S+)", str(e))
    return m.group(1) if m else _first_line(e)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def build_module(factory: Callable[[], nn.Module], state_dict: Mapping[str, torch.Tensor], source: Union[str, Path],
                 dtype: Optional[torch.dtype] = None, device: Union[str, torch.device, None] = None,
                 ignored_keys: tuple = ()) -> nn.Module:
    """Build `factory()` on meta, check `state_dict` against it key by key, and assign the tensors."""
    with torch.device("meta"):
        module = factory()
    return assign_checked(module, state_dict, source, dtype, device, ignored_keys)


def assign_checked(module: nn.Module, state_dict: Mapping[str, torch.Tensor], source: Union[str, Path],
                   dtype: Optional[torch.dtype] = None, device: Union[str, torch.device, None] = None,
                   ignored_keys: tuple = ()) -> nn.Module:
    """Check `state_dict` against the (meta) `module` key by key and shape by shape, then assign it."""
    expected = module.state_dict()
    given = {k: v for k, v in state_dict.items() if not any(k.endswith(i) for i in ignored_keys)}
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    if missing:
        raise ModelLoadError(f"{source}: missing tensor {missing[0]!r}" + _more(missing))
    if unexpected:
        raise ModelLoadError(f"{source}: unexpected tensor {unexpected[0]!r}" + _more(unexpected))
    for key, ref in expected.items():
        if tuple(given[key].shape) != tuple(ref.shape):
            raise ModelLoadError(f"{source}: tensor {key!r} has shape {tuple(given[key].shape)}, "
                                 f"the config expects {tuple(ref.shape)}")
        if ref.is_floating_point() and not given[key].is_floating_point():
            raise ModelLoadError(f"{source}: tensor {key!r} has dtype {str(given[key].dtype).removeprefix('torch.')}; "
                                 f"weights must be floating point (float32, float16 or bfloat16)")
    module.load_state_dict({k: _aligned(v) for k, v in given.items()}, strict=True, assign=True)
    # weights in a floating dtype follow `dtype`; integer buffers (none today) would keep theirs
    if dtype is not None or device is not None:
        module.to(device=device, dtype=dtype)
    return module.eval().requires_grad_(False)


def _aligned(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor`, or a copy of it in memory aligned as torch's allocator aligns it, when it is not."""
    return tensor if tensor.data_ptr() % ALIGNMENT == 0 else tensor.clone()


def _more(keys: list) -> str:
    return f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""


def find_weights_file(folder: Path, prefer_fp16: bool = False) -> Path:
    """The weights file of a diffusers component folder: safetensors first, the fp16 variant when asked
    for (or when it is the only one), pickles last."""
    candidates = []
    for name in _WEIGHT_NAMES:
        full, half = folder / f"{name}.safetensors", folder / f"{name}.fp16.safetensors"
        candidates += [half, full] if prefer_fp16 else [full, half]
    for name in _WEIGHT_NAMES:
        candidates += [folder / f"{name}.bin", folder / f"{name}.fp16.bin"]
    for path in candidates:
        if path.is_file():
            return path
    if not folder.is_dir():
        raise ModelLoadError(f"missing model component folder: {folder}")
    raise ModelLoadError(f"{folder}: no weights file (expected diffusion_pytorch_model.safetensors or model.safetensors)")

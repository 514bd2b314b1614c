"""Images in and out of the pipeline: PIL / numpy / tensor conversions and inpainting masks.

Conventions follow diffusers' `VaeImageProcessor`, so the same PIL input gives the same tensors:
pixels / 255 in float32; masks converted to grayscale ("L"), resized with Lanczos, binarized at 0.5;
outputs (x / 2 + 0.5).clamp(0, 1), and PIL bytes round(255 * x).
"""
from __future__ import annotations

from typing import Any, Optional, Union

import numpy as np
import PIL.Image
import torch

from sdrt.errors import InvalidInputError

ImageInput = Union[PIL.Image.Image, np.ndarray, torch.Tensor]
IMAGE_FORMS = "a PIL RGB image, an HxWx3 uint8 (or [0, 1] float) array, or a [3, H, W] / [1, 3, H, W] tensor in [0, 1]"
MASK_FORMS = ("a PIL image of mode 1, L or RGB, an HxW / HxWx1 / HxWx3 array (uint8, bool or [0, 1] float), "
              "or an [H, W] / [1, H, W] / [1, 1, H, W] tensor in [0, 1]")
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # PIL's convert("L") weights


def _array_in_unit_range(arr: np.ndarray, name: str, forms: str) -> np.ndarray:
    """uint8 -> /255, bool -> 0/1, float -> checked to lie in [0, 1]; float32 out."""
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    if arr.dtype == np.bool_:
        return arr.astype(np.float32)
    if np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float32)
        if not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 1:
            raise InvalidInputError(f"{name} values must lie in [0, 1]; expected {forms}")
        return arr
    raise InvalidInputError(f"{name} has dtype {arr.dtype}; expected {forms}")


def _check_not_empty(name: str, value: Any) -> None:
    """Refuse an image or mask with no pixels (a side of 0), which numpy and PIL fail on obscurely."""
    size = value.size if isinstance(value, PIL.Image.Image) else tuple(value.shape)
    if 0 in size:
        raise InvalidInputError(f"{name} is empty (size {size}); it needs at least one pixel")


def eight_bit(image: PIL.Image.Image) -> PIL.Image.Image:
    """A PIL image as read from a file -> an 8-bit mode: 16-bit grayscale ("I;16*", "I") scaled to "L"
    (PIL's own convert clips those values at 255, so any 16-bit picture would come out white), a palette
    image to "RGB" (or "RGBA" when it has transparency); other modes unchanged."""
    if image.mode == "I" or image.mode.startswith("I;16"):
        arr = np.asarray(image).astype(np.float64)
        return PIL.Image.fromarray(np.clip(np.round(arr / 257.0), 0, 255).astype(np.uint8))
    if image.mode == "P":
        return image.convert("RGBA" if "transparency" in image.info else "RGB")
    return image


def image_to_tensor(image: Any) -> torch.Tensor:
    """An input image -> float32 [1, 3, H, W] in [0, 1] on the CPU."""
    if isinstance(image, (PIL.Image.Image, np.ndarray)) or torch.is_tensor(image):
        _check_not_empty("image", image)
    if isinstance(image, PIL.Image.Image):
        if image.mode != "RGB":
            raise InvalidInputError(f"image has PIL mode {image.mode!r}; expected {IMAGE_FORMS} "
                                    f"(convert it with sdrt.images.eight_bit(image).convert('RGB'); "
                                    f"PIL's own convert clips 16-bit images to white)")
        arr = np.asarray(image).astype(np.float32) / 255.0
    elif isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise InvalidInputError(f"image array has shape {image.shape}; expected {IMAGE_FORMS}")
        arr = _array_in_unit_range(image, "image", IMAGE_FORMS)
    elif torch.is_tensor(image):
        t = image.detach().to("cpu")
        if t.dim() == 3:
            t = t.unsqueeze(0)
        if t.dim() != 4 or t.shape[:2] != (1, 3) or not t.is_floating_point():
            raise InvalidInputError(f"image tensor has shape {tuple(image.shape)} and dtype {image.dtype}; "
                                    f"expected {IMAGE_FORMS}")
        t = t.float()
        if not torch.isfinite(t).all() or t.min() < 0 or t.max() > 1:
            raise InvalidInputError(f"image tensor values must lie in [0, 1]; expected {IMAGE_FORMS}")
        return t.contiguous()
    else:
        raise InvalidInputError(f"image is a {type(image).__name__}; expected {IMAGE_FORMS}")
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).unsqueeze(0)


LATENT_CHANNELS = 4


def latent_image(image: Any) -> Optional[torch.Tensor]:
    """Latents given as the image (as diffusers' img2img pipelines take them): a floating [n, 4, h, w] tensor in
    the U-Net's scaled space, e.g. a previous call's `result.latents` -> float32 on the CPU; None for any
    other input (a pixel image: see `image_to_tensor`)."""
    if not (torch.is_tensor(image) and image.dim() == 4 and image.shape[1] == LATENT_CHANNELS):
        return None
    if not image.is_floating_point() or not torch.isfinite(image).all() or 0 in image.shape:
        raise InvalidInputError(f"latents given as image must be a non-empty floating tensor [n, 4, h, w] of finite "
                                f"values, got dtype {image.dtype} shape {tuple(image.shape)}")
    return image.detach().to("cpu", torch.float32)


def mask_to_tensor(mask: Any, height: int, width: int) -> torch.Tensor:
    """An inpainting mask (white = repaint) -> float32 [1, 1, height, width] of exact 0s and 1s.
    Resized to the image's size when it differs."""
    if isinstance(mask, (PIL.Image.Image, np.ndarray)) or torch.is_tensor(mask):
        _check_not_empty("mask", mask)
    if isinstance(mask, PIL.Image.Image):
        if mask.mode not in ("1", "L", "RGB"):
            raise InvalidInputError(f"mask has PIL mode {mask.mode!r}; expected {MASK_FORMS}")
        gray = mask.convert("L")
        if gray.size != (width, height):
            gray = gray.resize((width, height), PIL.Image.Resampling.LANCZOS)
        arr = np.asarray(gray).astype(np.float32) / 255.0
    else:
        arr = _mask_array(mask)
        if arr.shape != (height, width):
            resized = PIL.Image.fromarray(arr, mode="F").resize((width, height), PIL.Image.Resampling.LANCZOS)
            arr = np.asarray(resized, dtype=np.float32)
    binary = (arr >= 0.5).astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(binary))[None, None]


def _mask_array(mask: Any) -> np.ndarray:
    """A numpy or tensor mask -> float32 HxW in [0, 1] (RGB masks by their luma)."""
    if torch.is_tensor(mask):
        t = mask.detach().to("cpu")
        while t.dim() > 2 and t.shape[0] == 1:
            t = t[0]
        if t.dim() != 2 or not (t.is_floating_point() or t.dtype == torch.bool):
            raise InvalidInputError(f"mask tensor has shape {tuple(mask.shape)} and dtype {mask.dtype}; "
                                    f"expected {MASK_FORMS}")
        arr = t.float().numpy()
        if not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 1:
            raise InvalidInputError(f"mask tensor values must lie in [0, 1]; expected {MASK_FORMS}")
        return arr
    if not isinstance(mask, np.ndarray):
        raise InvalidInputError(f"mask is a {type(mask).__name__}; expected {MASK_FORMS}")
    if mask.ndim == 3 and mask.shape[2] in (1, 3):
        arr = _array_in_unit_range(mask, "mask", MASK_FORMS)
        return arr[..., 0] if arr.shape[2] == 1 else arr @ _LUMA
    if mask.ndim != 2:
        raise InvalidInputError(f"mask array has shape {mask.shape}; expected {MASK_FORMS}")
    return _array_in_unit_range(mask, "mask", MASK_FORMS)


def to_unit_range(decoded: torch.Tensor) -> torch.Tensor:
    """Decoded images [B, 3, H, W] in about [-1, 1] -> float32 [B, 3, H, W] in [0, 1] on the CPU."""
    return (decoded / 2 + 0.5).clamp(0, 1).float().cpu()


def to_numpy(pixels: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] in [0, 1] -> float32 [B, H, W, 3]."""
    return pixels.permute(0, 2, 3, 1).contiguous().numpy()


def to_pil(images: np.ndarray) -> list[PIL.Image.Image]:
    """float [B, H, W, 3] in [0, 1] -> RGB PIL images."""
    return [PIL.Image.fromarray(img) for img in (images * 255).round().astype(np.uint8)]

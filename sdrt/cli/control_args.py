"""`sdrt generate`'s ControlNet arguments: `--controlnet PATH` and `--control-image IMG` (repeatable, one image per
ControlNet), `--control-preprocess NAME` and `--control-scale S` (once for all, or once per ControlNet); and what
the PNG parameters record of them.

Counts, paths, preprocessor names and scales are checked when the arguments are parsed or before torch is
imported; the ControlNets' contents when the pipeline loads them (see docs/controlnet.md)."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Callable, Optional

from sdrt.cli.adapters import finite_number
from sdrt.control_preprocess import check_preprocessor
from sdrt.errors import InvalidInputError

READY = "none"  # --control-preprocess none: the control image is used as it is


def parse_controlnet(text: str) -> Path:
    path = Path(text).expanduser()
    if not path.exists():
        raise InvalidInputError(f"--controlnet {text!r}: no such file or folder")
    return path


def parse_preprocess(text: str) -> Optional[str]:
    if text == READY:
        return None
    try:
        check_preprocessor(text)
    except InvalidInputError as e:
        raise InvalidInputError(f"--control-preprocess: {e} (or {READY})") from None
    return text


def parse_scale(text: str) -> float:
    scale = finite_number(text)
    if scale is None:
        raise InvalidInputError(f"--control-scale must be a finite number, got {text!r}")
    return scale


def add_arguments(p: argparse.ArgumentParser, arg_type: Callable) -> None:
    """`arg_type` turns a checker into an argparse type (see sdrt.cli.generate)."""
    p.add_argument("--controlnet", type=arg_type(parse_controlnet), action="append", default=[], metavar="PATH",
                   help="ControlNet folder or single file; repeatable (several are summed); see docs/controlnet.md")
    p.add_argument("--control-image", type=Path, action="append", default=[], metavar="IMG",
                   help="control image, one per --controlnet in the same order; of the output's size")
    p.add_argument("--control-preprocess", type=arg_type(parse_preprocess), action="append", default=[],
                   metavar="NAME", help=f"make the control image from the picture: canny or canny:LOW:HIGH, or "
                                        f"{READY}; once for all or once per --controlnet (default {READY})")
    p.add_argument("--control-scale", type=arg_type(parse_scale), action="append", default=[], metavar="S",
                   help="controlnet_conditioning_scale, once for all or once per --controlnet (default as "
                        "diffusers: 1.0 txt2img, 0.8 img2img, 0.5 inpainting)")


def _one_or_each(values: list, n: int, option: str) -> Any:
    """A repeatable option given once (for all) or once per ControlNet -> the pipeline's argument."""
    if not values:
        return None
    if len(values) not in (1, n):
        raise InvalidInputError(f"{option} must be given once or once per --controlnet ({n}), got {len(values)}")
    return values[0] if len(values) == 1 else values


def check(args: argparse.Namespace) -> None:
    """The counts agree: one --control-image per --controlnet, the others once or once per ControlNet."""
    n = len(args.controlnet)
    if n == 0:
        used = [o for o, v in (("--control-image", args.control_image), ("--control-preprocess",
                args.control_preprocess), ("--control-scale", args.control_scale)) if v]
        if used:
            raise InvalidInputError(f"{', '.join(used)} need{'s' * (len(used) == 1)} --controlnet PATH")
        return
    if len(args.control_image) != n:
        raise InvalidInputError(f"give one --control-image per --controlnet ({n}), got {len(args.control_image)}")
    _one_or_each(args.control_preprocess, n, "--control-preprocess")
    _one_or_each(args.control_scale, n, "--control-scale")


def call_arguments(args: argparse.Namespace, open_image: Callable[[Path, str], Any]) -> dict:
    """The pipeline call's control keyword arguments; `open_image(path, option name)` reads each picture."""
    n = len(args.controlnet)
    if n == 0:
        return {}
    pictures = [open_image(path, "control-image") for path in args.control_image]
    from sdrt.images import eight_bit  # torch: after every picture's size is checked
    images = [eight_bit(picture).convert("RGB") for picture in pictures]
    out = {"control_image": images[0] if n == 1 else images,
           "control_preprocess": _one_or_each(args.control_preprocess, n, "--control-preprocess")}
    scale = _one_or_each(args.control_scale, n, "--control-scale")
    if scale is not None:
        out["controlnet_conditioning_scale"] = scale
    return out


def controlnet_argument(args: argparse.Namespace) -> Any:
    """`sdrt.load`'s controlnet=: None, one path, or the list."""
    if not args.controlnet:
        return None
    return args.controlnet[0] if len(args.controlnet) == 1 else list(args.controlnet)


def control_parameters(args: argparse.Namespace, default_scales: dict) -> dict:
    """What the PNG parameters record: each ControlNet with its image, preprocessor and scale (the mode's
    default in `default_scales` when --control-scale is not given)."""
    n = len(args.controlnet)
    if n == 0:
        return {}
    scale = default_scales["txt2img" if args.image is None else "img2img" if args.mask is None else "inpaint"]

    def each(values: list, default: Any) -> list:
        return [default] * n if not values else values * n if len(values) == 1 else values
    rows = zip(args.controlnet, args.control_image, each(args.control_preprocess, None),
               each(args.control_scale, scale))
    return {"controlnets": [{"path": str(path.resolve()), "image": str(image.resolve()),
                             "preprocess": pre or READY, "scale": s} for path, image, pre, s in rows]}

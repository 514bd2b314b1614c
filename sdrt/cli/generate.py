"""`sdrt generate`: prompt -> PNG(s) carrying their generation parameters.

Arguments are checked before torch is imported or the model loaded, so bad input fails at once; the
output path and the input images' sizes (from their headers) are checked before any work, and files are
written to a temporary name and renamed. The limits on steps, images and pixels are `sdrt.Limits.from_env()`.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from sdrt import __version__
from sdrt.cli import adapters, control_args
from sdrt.checks import (DEFAULT_STRENGTH, LIMIT_VARIABLES, MAX_SIZE, PREDICTION_TYPES, Limits, check_file_name,
                         check_guidance, check_image_count, check_pixels, check_positive_int, check_size, check_steps,
                         check_strength, check_text)
from sdrt.errors import InvalidInputError
from sdrt.png import check_writable

HELP = "generate images: txt2img, img2img (--image) or inpainting (--image and --mask)"


def _arg_type(check):
    """An argparse type from a checker that raises InvalidInputError."""
    def parse(text: str):
        try:
            return check(text)
        except (InvalidInputError, ValueError) as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return parse


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise InvalidInputError(f"expected a number, got {text!r}") from None


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise InvalidInputError(f"expected an integer, got {text!r}") from None


def parse_size(text: str) -> tuple[int, int]:
    """"WxH" (or "N" for a square) -> (width, height)."""
    parts = text.lower().split("x")
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2:
        raise InvalidInputError(f"size must be WxH, e.g. 512x512, got {text!r}")
    width, height = (_integer(p) for p in parts)
    return check_size("width", width), check_size("height", height)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", type=_arg_type(lambda t: check_text("prompt", t)), help="what to draw")
    p.add_argument("-o", "--output", default="out.png",
                   help="PNG to write (default out.png); with --num N > 1: out-1.png ... out-N.png")
    p.add_argument("--model", help="diffusers folder or .safetensors checkpoint (default: the bundled tiny model)")
    p.add_argument("--negative", type=_arg_type(lambda t: check_text("--negative", t)), default=None,
                   help="negative prompt")
    p.add_argument("--steps", type=_arg_type(lambda t: check_positive_int("steps", _integer(t))), default=30,
                   help=f"denoising steps, 1 to max_steps ({Limits.max_steps} unless {LIMIT_VARIABLES['max_steps']} "
                        f"sets it; the lcm scheduler allows its original_inference_steps, usually 50) (default 30)")
    p.add_argument("--guidance", type=_arg_type(lambda t: check_guidance(_number(t))), default=7.5,
                   help="classifier-free guidance scale (>= 0; > 1 enables guidance; default 7.5)")
    p.add_argument("--scheduler", default="ddim",
                   help="ddim, ddpm, euler, euler_a, dpmpp_2m, dpmpp_2m_karras or lcm (default ddim)")
    p.add_argument("--eta", type=_arg_type(_number), default=0.0, help="DDIM noise weight (default 0)")
    p.add_argument("--seed", type=_arg_type(_integer), default=None, help="default: a fresh random seed")
    p.add_argument("--size", type=_arg_type(parse_size), default=None, metavar="WxH",
                   help="image size, multiples of 8 (default: the model's native size, or the --image size)")
    p.add_argument("--num", type=_arg_type(lambda t: check_positive_int("num", _integer(t))), default=1,
                   help=f"number of images, 1 to max_images ({Limits.max_images} unless "
                        f"{LIMIT_VARIABLES['max_images']} sets it) (default 1)")
    p.add_argument("--image", type=Path, help="input image for img2img / inpainting")
    p.add_argument("--strength", type=_arg_type(lambda t: check_strength(_number(t))), default=None,
                   help="img2img / inpainting: how much to change the image, in [0, 1] (default as diffusers: "
                        f"{DEFAULT_STRENGTH['img2img']} img2img, {DEFAULT_STRENGTH['inpaint']} inpainting; SDXL: "
                        "0.3 and 0.9999)")
    p.add_argument("--mask", type=Path, help="inpainting mask: white = repaint (single-channel or RGB)")
    p.add_argument("--vae", type=Path, default=None,
                   help="a VAE folder or .safetensors file replacing the model's (e.g. SDXL's fp16-fix VAE)")
    p.add_argument("--backend", default="torch",
                   help="torch, triton, onnxruntime, tensorrt, openvino or auto (default torch)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="float32, float16 or bfloat16 (default: float16 on cuda)")
    adapters.add_arguments(p, _arg_type)
    control_args.add_arguments(p, _arg_type)
    p.add_argument("--prediction-type", choices=PREDICTION_TYPES, default=None,
                   help="override the model's prediction type (default: the model's; an SD 2.x single file that "
                        "does not say is assumed v_prediction, 768x768)")


def output_paths(output: str, num: int) -> list[Path]:
    if num == 1:
        return [check_writable(output)]
    path = check_file_name(output, suffix=".png")  # said of the path given, not of a numbered name made from it
    return [check_writable(path.with_name(f"{path.stem}-{k}{path.suffix}")) for k in range(1, num + 1)]


def _open_image(path: Path, name: str, limits: Limits):
    """The picture as viewers show it: a camera's EXIF orientation applied (as diffusers' load_image does).
    Its size is checked from the file's header, before the pixels are decoded."""
    import PIL.Image
    import PIL.ImageOps
    shown = f"--{name} {str(path)!r}"
    try:
        with warnings.catch_warnings():  # Pillow warns of big images itself; the check below says it in one line
            warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)
            img = PIL.Image.open(path)
        with img:
            width, height = img.size
            if max(width, height) > MAX_SIZE:
                raise InvalidInputError(f"{shown}: {width}x{height} is too large (sides up to {MAX_SIZE})")
            check_pixels(height, width, limits, f"{shown}: the image's size")
            img.load()
            return PIL.ImageOps.exif_transpose(img)
    except FileNotFoundError:
        raise InvalidInputError(f"{shown}: no such file") from None
    except PIL.Image.DecompressionBombError as e:
        raise InvalidInputError(f"{shown}: too large ({e})") from None
    except OSError as e:
        raise InvalidInputError(f"{shown}: not a readable image ({e})") from None


def run(args: argparse.Namespace) -> int:
    limits = Limits.from_env()
    check_steps(args.steps, limits)
    check_image_count(args.num, limits, f"--num {args.num}")
    if args.size is not None:
        check_pixels(args.size[1], args.size[0], limits, f"--size {args.size[0]}x{args.size[1]}")
    paths = output_paths(args.output, args.num)
    if args.mask is not None and args.image is None:
        raise InvalidInputError("--mask needs --image (the image to inpaint)")
    control_args.check(args)
    image = None if args.image is None else _open_image(args.image, "image", limits)
    mask = None if args.mask is None else _open_image(args.mask, "mask", limits)
    control = control_args.call_arguments(args, lambda path, name: _open_image(path, name, limits))
    width, height = args.size if args.size is not None else (None, None)

    import sdrt  # torch from here on
    from tqdm import tqdm
    from sdrt.images import eight_bit

    # files hold pictures in any mode: the image becomes RGB (alpha dropped), the mask 8-bit (L, RGB or RGBA)
    image = None if image is None else eight_bit(image).convert("RGB")
    mask = None if mask is None else eight_bit(mask)

    pipe = sdrt.load(args.model, backend=args.backend, device=args.device, dtype=args.dtype,
                     prediction_type=args.prediction_type, limits=limits, lora_dirs=args.lora_dir or None,
                     controlnet=control_args.controlnet_argument(args), vae=args.vae)
    tokens = adapters.load_adapters(pipe, args)
    with tqdm(total=None, unit="step", disable=not sys.stderr.isatty(), leave=False) as bar:
        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        result = pipe(args.prompt, negative_prompt=args.negative, steps=args.steps, guidance_scale=args.guidance,
                      scheduler=args.scheduler, eta=args.eta, height=height, width=width, num_images=args.num,
                      seed=args.seed, image=image, strength=args.strength, mask=mask, progress=progress, **control)

    from sdrt.png import save_png
    out_height, out_width = result.images[0].height, result.images[0].width
    for k, (img, path, seed) in enumerate(zip(result.images, paths, result.seeds)):
        parameters = {
            "prompt": args.prompt, "negative_prompt": args.negative, "steps": args.steps,
            "scheduler": args.scheduler, "guidance": args.guidance, "eta": args.eta, "seed": seed,
            "size": f"{out_width}x{out_height}", "model": None if args.model is None else str(Path(args.model).resolve()),
            "backend": args.backend, "device": str(pipe.device), "dtype": str(pipe.dtype).removeprefix("torch."),
            "sdrt": __version__,
        }
        parameters.update(adapters.adapter_parameters(pipe, args, tokens))
        parameters.update(control_args.control_parameters(args, pipe.control_scale_defaults))
        if args.prediction_type is not None:
            parameters.update(prediction_type=args.prediction_type)
        if args.vae is not None:
            parameters.update(vae=str(args.vae.resolve()))
        if args.num > 1:  # one seed drives the whole batch: image k is regenerated by the batch
            parameters.update(num=args.num, index=k + 1)
        if image is not None:
            parameters.update(image=str(args.image.resolve()),
                              strength=pipe.default_strength(mask is not None) if args.strength is None
                              else args.strength)
        if mask is not None:
            parameters.update(mask=str(args.mask.resolve()))
        save_png(img, path, parameters)
        print(path)
    return 0

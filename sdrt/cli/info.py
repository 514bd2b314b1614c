"""`sdrt info`: versions of the stack, the GPU, and which backends can run here."""
from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import platform

from sdrt import __version__

HELP = "print versions of torch/CUDA/triton/onnxruntime/tensorrt, the GPU, and the usable backends"

# backend -> (python packages it needs, whether it needs CUDA)
BACKEND_NEEDS = {
    "torch": ((), False),
    "triton": (("triton",), True),
    "onnxruntime": (("onnx", "onnxruntime"), False),
    "openvino": (("onnx", "openvino"), False),
    "tensorrt": (("onnx", "tensorrt"), True),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def package_version(name: str):
    """The installed version of a distribution (or an importable module), None when absent."""
    for dist in (name, f"{name}-gpu", f"{name}-cu12"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None if importlib.util.find_spec(name) is None else "installed"


def backend_status(name: str, cuda: bool) -> str:
    """'yes', or 'no (why)'."""
    packages, needs_cuda = BACKEND_NEEDS[name]
    if importlib.util.find_spec(f"sdrt.backends.{name}_backend") is None:
        return "no (not implemented in this sdrt)"
    missing = [p for p in packages if package_version(p) is None]
    if missing:
        return f"no ({', '.join(missing)} not installed)"
    if needs_cuda and not cuda:
        return "no (needs a CUDA GPU)"
    return "yes"


def run(args: argparse.Namespace) -> int:
    import torch

    cuda = torch.cuda.is_available()
    lines = [
        f"sdrt         {__version__}",
        f"python       {platform.python_version()} ({platform.system()} {platform.machine()})",
        f"torch        {torch.__version__} (CUDA build {torch.version.cuda or 'none'}, "
        f"CUDA {'available' if cuda else 'not available'})",
    ]
    if cuda:
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            lines.append(f"gpu {i}        {props.name}, {props.total_memory / 2**30:.1f} GiB, "
                         f"sm_{props.major}{props.minor}")
    else:
        lines.append("gpu          none")
    for name in ("triton", "onnx", "onnxruntime", "openvino", "tensorrt"):
        lines.append(f"{name:<12} {package_version(name) or 'not installed'}")
    lines.append("backends")
    for name in BACKEND_NEEDS:
        lines.append(f"  {name:<12} {backend_status(name, cuda)}")
    print("\n".join(lines))
    return 0

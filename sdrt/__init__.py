"""sdrt: a Stable Diffusion inference runtime."""
from sdrt.checks import Limits
from sdrt.errors import (BackendUnavailableError, InvalidInputError, ModelLoadError, NumericalError,
                         SdrtError)

__all__ = ["load", "Pipeline", "GenerationResult", "Limits",
           "SdrtError", "ModelLoadError", "InvalidInputError", "BackendUnavailableError", "NumericalError"]
__version__ = "0.1.0"

_PIPELINE_EXPORTS = ("load", "Pipeline", "GenerationResult")


def __getattr__(name: str):
    # Imported on first use: `import sdrt` (and so the CLI's argument checks and --help) stays free of
    # torch's multi-second import until a pipeline is actually needed.
    if name in _PIPELINE_EXPORTS:
        from sdrt import pipeline
        return getattr(pipeline, name)
    raise AttributeError(f"module 'sdrt' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_PIPELINE_EXPORTS))

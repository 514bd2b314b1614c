"""sdrt: a Stable Diffusion inference runtime."""
from sdrt.errors import (BackendUnavailableError, InvalidInputError, ModelLoadError, NumericalError,
                         SdrtError)

__all__ = ["SdrtError", "ModelLoadError", "InvalidInputError", "BackendUnavailableError", "NumericalError"]
__version__ = "0.1.0"

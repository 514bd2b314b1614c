"""The exceptions sdrt raises. Every one derives from SdrtError."""


class SdrtError(Exception):
    """Base class of every error sdrt raises on purpose."""


class ModelLoadError(SdrtError):
    """A model folder or checkpoint is missing, corrupt, or describes something sdrt does not support."""


class InvalidInputError(SdrtError, ValueError):
    """An argument is out of range or of the wrong kind; the message names it and the allowed values."""


class BackendUnavailableError(SdrtError):
    """The requested backend cannot run here (missing package, no CUDA, ...)."""


class NumericalError(SdrtError):
    """A result held NaN or inf; raised instead of returning a silently wrong image."""


class LoraFileError(ModelLoadError, InvalidInputError):
    """A LoRA file that is missing or does not fit the model (unknown key, wrong shape): both a bad input of
    `load_lora` and a model file that cannot be loaded."""

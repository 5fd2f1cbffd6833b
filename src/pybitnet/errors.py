"""Typed errors. Each carries a message that tells the user what went wrong and what to do about it."""


class PyBitNetError(Exception):
    """Base class of every error pybitnet raises on purpose."""


class ModelNotFoundError(PyBitNetError):
    """A model id or path does not resolve to local files (missing, or offline and not cached)."""


class ConfigError(PyBitNetError):
    """A model config is missing, not valid JSON, or describes something pybitnet cannot build."""


class UnsupportedModelError(ConfigError):
    """The config names an architecture or model_type pybitnet does not implement."""


class WeightsError(PyBitNetError):
    """Weight files are missing, truncated, corrupt, or hold tensors of the wrong name, shape or dtype."""


class LayoutError(PyBitNetError):
    """A ternary weight cannot be packed into, or unpacked from, a layout (shape or byte-size mismatch)."""


class KernelError(PyBitNetError):
    """A kernel was requested that does not exist or cannot run on this device/CPU."""


class InvalidRequestError(PyBitNetError, ValueError):
    """A generation request is invalid: an empty prompt, a sampling parameter out of range, a bad token id."""


class ContextLengthError(InvalidRequestError):
    """A prompt does not fit in the model's context window (or the context size the engine was given)."""


class TokenizerError(PyBitNetError):
    """Tokenizer files are missing or invalid, or a chat template is missing or fails to render."""


class InputFileError(PyBitNetError):
    """An input file (prompts for batch generation) is unreadable, of an unknown kind, or malformed."""

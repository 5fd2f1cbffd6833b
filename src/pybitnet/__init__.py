"""pybitnet: BitNet b1.58 ternary language models in Python."""

from .api import load_model
from .engine import LLM, SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "__version__", "load_model"]

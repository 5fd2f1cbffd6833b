"""Torch modules: BitLinear (training and packed inference forms) and RMSNorm."""

from .bitlinear import BitLinear, PackedBitLinear
from .norm import RMSNorm

__all__ = ["BitLinear", "PackedBitLinear", "RMSNorm"]

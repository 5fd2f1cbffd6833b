"""The math of BitNet b1.58: ternary weights, int8 activations, STE, packed layouts."""

from .activations import absmax_scale, fake_quantize_activations, quantize_activations
from .layouts import PackedWeight, get_layout, list_layouts, pack, repack, unpack
from .ste import ste_activations, ste_weight
from .ternary import TernaryWeight, absmean_scale, fake_quantize_weight, quantize_weight

__all__ = [
    "PackedWeight",
    "TernaryWeight",
    "absmax_scale",
    "absmean_scale",
    "fake_quantize_activations",
    "fake_quantize_weight",
    "get_layout",
    "list_layouts",
    "pack",
    "quantize_activations",
    "quantize_weight",
    "repack",
    "ste_activations",
    "ste_weight",
    "unpack",
]

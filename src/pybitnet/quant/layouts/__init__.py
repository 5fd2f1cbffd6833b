"""Packed ternary layouts; importing this package registers every built-in layout."""

from . import cpu_i2, gguf_tq, hf, i2s, triton_i2
from .registry import Layout, PackedWeight, get_layout, list_layouts, pack, register_layout, repack, unpack

__all__ = [
    "Layout",
    "PackedWeight",
    "cpu_i2",
    "get_layout",
    "gguf_tq",
    "hf",
    "i2s",
    "list_layouts",
    "pack",
    "register_layout",
    "repack",
    "triton_i2",
    "unpack",
]

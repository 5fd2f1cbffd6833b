"""Packed ternary layouts; importing this package registers every built-in layout."""

from . import hf
from .registry import Layout, PackedWeight, get_layout, list_layouts, pack, register_layout, repack, unpack

__all__ = [
    "Layout",
    "PackedWeight",
    "get_layout",
    "hf",
    "list_layouts",
    "pack",
    "register_layout",
    "repack",
    "unpack",
]

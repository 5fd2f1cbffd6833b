"""The layout registry: one row per packed ternary layout (name, bits per weight, pack, unpack).

Like ggml's type-traits table. Every layout converts to and from the canonical `TernaryWeight`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ...errors import LayoutError
from ..ternary import TernaryWeight


@dataclass(frozen=True)
class PackedWeight:
    """A ternary weight in some layout: `data` (uint8, layout-defined shape), `scale` as the layout stores it
    (float32; the meaning is the layout's), and the logical [out, in] shape."""

    layout: str
    data: torch.Tensor
    scale: torch.Tensor
    shape: tuple[int, int]


@dataclass(frozen=True)
class Layout:
    name: str
    bits_per_weight: float
    pack: Callable[[TernaryWeight], PackedWeight]
    unpack: Callable[[PackedWeight], TernaryWeight]
    description: str = ""


_LAYOUTS: dict[str, Layout] = {}
# (from, to) -> a direct conversion that skips the canonical form (layouts that share their bits)
_DIRECT: dict[tuple[str, str], Callable[[PackedWeight], PackedWeight]] = {}


def register_layout(layout: Layout) -> Layout:
    if layout.name in _LAYOUTS:
        raise ValueError(f"layout {layout.name!r} is already registered")
    _LAYOUTS[layout.name] = layout
    return layout


def get_layout(name: str) -> Layout:
    try:
        return _LAYOUTS[name]
    except KeyError:
        raise LayoutError(f"unknown layout {name!r}; known layouts: {', '.join(sorted(_LAYOUTS))}") from None


def list_layouts() -> list[Layout]:
    return list(_LAYOUTS.values())


def pack(tw: TernaryWeight, layout: str) -> PackedWeight:
    return get_layout(layout).pack(tw)


def unpack(pw: PackedWeight) -> TernaryWeight:
    return get_layout(pw.layout).unpack(pw)


def register_direct_conversion(src: str, dst: str, fn: Callable[[PackedWeight], PackedWeight]) -> None:
    """Declare a cheap conversion from layout `src` to `dst`, used by `repack` instead of the canonical
    form."""
    _DIRECT[(src, dst)] = fn


def repack(pw: PackedWeight, layout: str) -> PackedWeight:
    """Convert between layouts: no work when already in `layout`, a direct conversion where one is registered
    (e.g. the two HF scale conventions share their bits), else through the canonical form."""
    if pw.layout == layout:
        return pw
    direct = _DIRECT.get((pw.layout, layout))
    return direct(pw) if direct is not None else pack(unpack(pw), layout)


def check_codes(tw: TernaryWeight) -> None:
    if tw.codes.ndim != 2:
        raise LayoutError(f"ternary codes must be 2-D [out, in], got shape {tuple(tw.codes.shape)}")
    if tw.scale.numel() not in (1, tw.codes.shape[0]):
        raise LayoutError(
            f"scale must be per tensor or per output row ({tw.codes.shape[0]}), got {tw.scale.numel()} values"
        )

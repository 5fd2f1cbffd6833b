"""GPU layout of the Triton kernels ("triton_i2"): 2-bit codes, row-major, interleaved in 128-element blocks.

uint8 [out, Kp/4] with Kp = in rounded up to a multiple of 128 (padding holds weight 0). Codes are w+1 in
{0,1,2}. In each 128-element block of a row, byte j (0..31) holds elements j, j+32, j+64, j+96 at bits 7-6,
5-4, 3-2, 1-0: the byte order of bitnet.cpp's I2_S blocks, kept per output row. A kernel reads a tile of bytes
with wide coalesced loads and gets four contiguous 32-element slices of activations per byte column from a
shift and a mask, so no reshuffle is needed in registers. Rows concatenate (fused projections) by `torch.cat`.

Scale as in "hf": real weight = codes * scale, float32 [1] per tensor or [out] per output row.
"""

from __future__ import annotations

import torch

from ...errors import LayoutError
from ..ternary import TernaryWeight
from .registry import Layout, PackedWeight, check_codes, register_layout

BLOCK = 128
SHIFTS = (6, 4, 2, 0)  # bit offset of the code of slice s (elements s*32 .. s*32+31 of a block)


def padded_cols(cols: int) -> int:
    return -(-cols // BLOCK) * BLOCK


def pack_i2(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes [out, in] -> uint8 [out, padded_cols(in) / 4]."""
    out, cols = codes.shape
    kp = padded_cols(cols)
    c = torch.ones((out, kp), dtype=torch.uint8, device=codes.device)
    c[:, :cols] = (codes + 1).to(torch.uint8)
    c = c.view(out, kp // BLOCK, 4, 32)
    packed = c[:, :, 0] << SHIFTS[0]
    for s in range(1, 4):
        packed |= c[:, :, s] << SHIFTS[s]
    return packed.reshape(out, kp // 4)


def unpack_i2(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """uint8 [out, padded_cols(cols) / 4] -> int8 codes [out, cols]."""
    kp = padded_cols(cols)
    if packed.dtype != torch.uint8 or packed.ndim != 2 or packed.shape[1] != kp // 4:
        raise LayoutError(
            f"triton_i2 weight with {cols} input columns must be uint8 [out, {kp // 4}], "
            f"got {packed.dtype} {tuple(packed.shape)}"
        )
    out = packed.shape[0]
    blocks = packed.view(out, kp // BLOCK, 1, 32)
    shifts = torch.tensor(SHIFTS, dtype=torch.uint8, device=packed.device).view(1, 1, 4, 1)
    codes = ((blocks >> shifts) & 3).reshape(out, kp)[:, :cols]
    return codes.to(torch.int8) - 1


def _pack(tw: TernaryWeight) -> PackedWeight:
    check_codes(tw)
    return PackedWeight("triton_i2", pack_i2(tw.codes), tw.scale.float().reshape(-1), tw.shape)


def _unpack(pw: PackedWeight) -> TernaryWeight:
    out, cols = pw.shape
    if pw.data.shape[0] != out:
        raise LayoutError(f"triton_i2 weight must have {out} rows, got {pw.data.shape[0]}")
    scale = pw.scale.float().reshape(-1)
    return TernaryWeight(unpack_i2(pw.data, cols), scale.reshape(()) if scale.numel() == 1 else scale)


TRITON_I2 = register_layout(
    Layout("triton_i2", 2.0, _pack, _unpack, "GPU: row-major 2-bit, I2_S byte order per 128-block (Triton)")
)

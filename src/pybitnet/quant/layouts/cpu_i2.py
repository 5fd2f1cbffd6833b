"""CPU layout of the C kernels ("cpu_i2"): 2-bit codes in tiles of 4 rows x 128-element blocks.

uint8 [ceil(out/4), Kp/128, 4, 32] with Kp = in rounded up to a multiple of 128; rows past `out` and columns
past `in` hold weight 0. Codes are w+1 in {0,1,2}. For tile t and block b, the 4 rows' 32-byte runs lie side
by side (128 contiguous bytes): a GEMV streams a tile sequentially and reuses an activation block for 4 rows.
Byte m of a run holds elements m, m+32, m+64, m+96 of the block at bits 1-0, 3-2, 5-4, 7-6: shifting a 32-byte
vector right by 2j and masking with 3 yields elements 32j..32j+31 in natural order, with no shuffle.

Scale as in "hf": real weight = codes * scale, float32 [1] per tensor or [out] per output row.
"""

from __future__ import annotations

import torch

from ...errors import LayoutError
from ...formats.memory import streamed_copy
from ..ternary import TernaryWeight
from .registry import Layout, PackedWeight, check_codes, register_layout

BLOCK = 128
ROWS = 4


def padded_cols(cols: int) -> int:
    return -(-cols // BLOCK) * BLOCK


def tiled_shape(out: int, cols: int) -> tuple[int, int, int, int]:
    return (-(-out // ROWS), padded_cols(cols) // BLOCK, ROWS, 32)


def pack_tiles(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes [out, in] -> uint8 tiles [ceil(out/4), Kp/128, 4, 32]."""
    out, cols = codes.shape
    tiles, blocks, _, _ = tiled_shape(out, cols)
    c = torch.ones((tiles * ROWS, blocks * BLOCK), dtype=torch.uint8)
    c[:out, :cols] = (codes + 1).to(torch.uint8)
    c = c.view(tiles, ROWS, blocks, 4, 32)
    packed = c[:, :, :, 0] | (c[:, :, :, 1] << 2) | (c[:, :, :, 2] << 4) | (c[:, :, :, 3] << 6)
    return streamed_copy(packed.transpose(1, 2))  # the kernels stream it every token


def unpack_tiles(packed: torch.Tensor, out: int, cols: int) -> torch.Tensor:
    """uint8 tiles -> int8 codes [out, in]."""
    shape = tiled_shape(out, cols)
    if packed.dtype != torch.uint8 or tuple(packed.shape) != shape:
        raise LayoutError(
            f"cpu_i2 weight for a {out}x{cols} layer must be uint8 {list(shape)}, "
            f"got {packed.dtype} {tuple(packed.shape)}"
        )
    tiles, blocks, _, _ = shape
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(1, 1, 1, 4, 1)
    codes = (packed.transpose(1, 2).unsqueeze(3) >> shifts) & 3  # [tiles, rows, blocks, 4, 32]
    return codes.reshape(tiles * ROWS, blocks * BLOCK)[:out, :cols].to(torch.int8) - 1


def _pack(tw: TernaryWeight) -> PackedWeight:
    check_codes(tw)
    return PackedWeight(
        "cpu_i2", pack_tiles(tw.codes.cpu()), tw.scale.float().reshape(-1).contiguous(), tw.shape
    )


def _unpack(pw: PackedWeight) -> TernaryWeight:
    scale = pw.scale.float().reshape(-1)
    return TernaryWeight(unpack_tiles(pw.data, *pw.shape), scale.reshape(()) if scale.numel() == 1 else scale)


CPU_I2 = register_layout(
    Layout("cpu_i2", 2.0, _pack, _unpack, "CPU: 2-bit, tiles of 4 rows x 128-element blocks (C kernels)")
)

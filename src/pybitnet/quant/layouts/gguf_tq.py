"""GGUF ternary layouts TQ2_0 and TQ1_0 (llama.cpp), bit-exact with the `gguf` package's quants.py.

Both cut every row into blocks of 256 weights; each block ends with its fp16 scale d (weight = (q - 1) * d):
- TQ2_0, 66 bytes per block: 64 bytes of 2-bit codes q = w + 1. In each 128-weight half, byte m holds elements
  m, m+32, m+64, m+96 at bit pairs 0, 2, 4, 6.
- TQ1_0, 54 bytes per block: 52 bytes of base-3 digits, each byte a number v of five (last four bytes:
  four) trits stored as ceil(v * 256 / 243). Byte m of bytes 0-31 holds elements m + 32k (k = 0..4, the first
  the most significant trit), bytes 32-47 hold 160 + m + 16k, bytes 48-51 hold 240 + m + 4k (k = 0..3).

PackedWeight for these layouts: `data` is uint8 [out, in / 256 * block bytes], the rows exactly as the file
stores them, block scales included. `scale` is float32 [1] (per tensor) or [out] (per row): the scale the
blocks hold, after fp16 rounding. It is derived from `data`, which stays the source of truth when unpacking.

True ternary weights give every block of a row the same d (an all-zero block has d = 0, as quants.py writes
it), so unpacking recovers a per-tensor or per-row scale; blocks whose scales differ within a row are not a
ternary tensor and raise LayoutError.
"""

from __future__ import annotations

import torch

from ...errors import LayoutError
from ..ternary import TernaryWeight
from .registry import Layout, PackedWeight, check_codes, register_layout

QK = 256
BLOCK_BYTES = {"tq2_0": 66, "tq1_0": 54}
_POW3_DESC = (81, 27, 9, 3, 1)  # trit weights when packing, most significant first
_POW3_ASC = (1, 3, 9, 27, 81)  # multipliers that bring trit k to the top when unpacking
FP16_MAX = float(torch.finfo(torch.float16).max)


def check_tq_shape(shape: tuple[int, int], layout: str) -> None:
    if shape[1] % QK:
        raise LayoutError(
            f"{layout.upper()} packs rows in blocks of {QK} weights: in_features must be a multiple of {QK}, "
            f"got {shape[1]} (weight shape {list(shape)})"
        )


def row_bytes(cols: int, layout: str) -> int:
    return cols // QK * BLOCK_BYTES[layout]


def _block_codes_and_scales(tw: TernaryWeight, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes [out, nb, 256] int32, d [out, nb] fp16) as quants.py derives them from codes * scale: d is the
    block's absmax (|scale|, or 0 for an all-zero block) and a negative scale flips the codes."""
    check_codes(tw)
    check_tq_shape(tw.shape, layout)
    out, cols = tw.shape
    scale = tw.scale.detach().float().reshape(-1).expand(out).cpu()
    if not torch.isfinite(scale).all():
        raise LayoutError(f"{layout.upper()} cannot store a non-finite scale")
    codes = tw.codes.cpu().to(torch.int32) * torch.sign(scale).to(torch.int32)[:, None]
    codes = codes.view(out, cols // QK, QK)
    magnitude = scale.abs()
    used = codes.ne(0).any(-1)
    d_row = magnitude.to(torch.float16)
    lost = used.any(-1) & ((d_row == 0) | torch.isinf(d_row))
    if lost.any():
        bad = magnitude[lost][0].item()
        raise LayoutError(
            f"{layout.upper()} block scales are fp16: scale {bad:g} is outside fp16's range "
            f"(nonzero, at most {FP16_MAX:g})"
        )
    d = torch.where(used, d_row[:, None], torch.zeros((), dtype=torch.float16))
    return codes, d


def _with_scales(qs: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Append each block's fp16 scale (2 little-endian bytes): [out, nb, k] codes -> [out, nb * (k + 2)]."""
    out, nb, _ = qs.shape
    scale_bytes = d.contiguous().view(torch.uint8).view(out, nb, 2)
    return torch.cat((qs, scale_bytes), dim=-1).reshape(out, -1)


def _stored_scale(d: torch.Tensor, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes with blocks of d = 0 zeroed, canonical scale) from block scales d [out, nb] float32.

    A block whose d is 0 dequantizes to zeros whatever its codes say, so its codes are dropped. The remaining
    blocks must share one d per row; one d for the whole tensor gives a 0-d scale, else a per-row [out] one.
    Rows (or tensors) without any nonzero weight get scale 1: any scale represents them exactly.
    """
    if not torch.isfinite(d).all():
        raise LayoutError("a block scale is not a finite number (corrupt data?)")
    present = d.ne(0)
    codes = codes * present[..., None].to(codes.dtype)
    d_hi = torch.where(present, d, torch.full_like(d, -torch.inf)).amax(-1)
    d_lo = torch.where(present, d, torch.full_like(d, torch.inf)).amin(-1)
    any_row = present.any(-1)
    mixed = any_row & (d_hi != d_lo)
    if mixed.any():
        row = int(mixed.nonzero()[0, 0])
        raise LayoutError(
            f"{int(mixed.sum())} row(s) have blocks with different scales (row {row}: "
            f"{d_lo[row].item():g} to {d_hi[row].item():g}); a ternary weight holds one scale per tensor "
            "or per row, so this tensor was quantized from non-ternary values and cannot be loaded as "
            "BitNet weights"
        )
    row_scale = torch.where(any_row, d_hi, torch.ones_like(d_hi))
    values = row_scale[any_row].unique()
    if values.numel() <= 1:
        return codes, (values[0] if values.numel() else torch.ones(())).reshape(())
    return codes, row_scale


def _split_blocks(data: torch.Tensor, shape: tuple[int, int], layout: str) -> torch.Tensor:
    check_tq_shape(shape, layout)
    out, cols = shape
    expected = out * row_bytes(cols, layout)
    if data.dtype != torch.uint8 or data.numel() != expected:
        raise LayoutError(
            f"{layout.upper()} data for a {out}x{cols} weight must be {expected} uint8 bytes, "
            f"got {data.numel()} of {data.dtype}"
        )
    return data.reshape(out, cols // QK, BLOCK_BYTES[layout])


def _block_scales(blocks: torch.Tensor) -> torch.Tensor:
    return blocks[..., -2:].contiguous().view(torch.float16).squeeze(-1).float()


def pack_tq2_0(tw: TernaryWeight) -> PackedWeight:
    codes, d = _block_codes_and_scales(tw, "tq2_0")
    out, nb, _ = codes.shape
    q = (codes + 1).to(torch.uint8).view(out, nb, 2, 4, 32)
    qs = q[..., 0, :] | (q[..., 1, :] << 2) | (q[..., 2, :] << 4) | (q[..., 3, :] << 6)
    data = _with_scales(qs.reshape(out, nb, 64), d)
    return PackedWeight("tq2_0", data, _scale_of(d), tw.shape)


def unpack_tq2_0_bytes(data: torch.Tensor, shape: tuple[int, int]) -> TernaryWeight:
    blocks = _split_blocks(data, shape, "tq2_0")
    out, nb, _ = blocks.shape
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(4, 1)
    q = (blocks[..., :64].reshape(out, nb, 2, 1, 32) >> shifts) & 3
    if (q == 3).any():
        raise LayoutError("TQ2_0 data holds the 2-bit code 3, which is not a ternary value (corrupt data?)")
    codes = q.reshape(out, nb, QK).to(torch.int8) - 1
    codes, scale = _stored_scale(_block_scales(blocks), codes)
    return TernaryWeight(codes.reshape(shape), scale)


def pack_tq1_0(tw: TernaryWeight) -> PackedWeight:
    codes, d = _block_codes_and_scales(tw, "tq1_0")
    out, nb, _ = codes.shape
    q = codes + 1
    w5 = torch.tensor(_POW3_DESC, dtype=torch.int32).view(5, 1)
    qs0 = (q[..., :160].reshape(out, nb, 5, 32) * w5).sum(-2)
    qs1 = (q[..., 160:240].reshape(out, nb, 5, 16) * w5).sum(-2)
    qh = (q[..., 240:].reshape(out, nb, 4, 4) * w5[:4]).sum(-2)
    v = torch.cat((qs0, qs1, qh), dim=-1)
    qs = ((v * 256 + 242) // 243).to(torch.uint8)  # ceil(v * 256 / 243)
    data = _with_scales(qs, d)
    return PackedWeight("tq1_0", data, _scale_of(d), tw.shape)


def _trits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """[..., m] bytes -> [..., n, m] trits: multiplying by 3^k (mod 256) moves trit k to the top, where
    (x * 3) >> 8 reads it."""
    mult = torch.tensor(_POW3_ASC[:n], dtype=torch.int32).view(n, 1)
    return (((packed.to(torch.int32).unsqueeze(-2) * mult) & 0xFF) * 3) >> 8


def unpack_tq1_0_bytes(data: torch.Tensor, shape: tuple[int, int]) -> TernaryWeight:
    blocks = _split_blocks(data, shape, "tq1_0")
    out, nb, _ = blocks.shape
    t0 = _trits(blocks[..., :32], 5).reshape(out, nb, 160)
    t1 = _trits(blocks[..., 32:48], 5).reshape(out, nb, 80)
    t2 = _trits(blocks[..., 48:52], 4).reshape(out, nb, 16)
    codes = torch.cat((t0, t1, t2), dim=-1).to(torch.int8) - 1
    codes, scale = _stored_scale(_block_scales(blocks), codes)
    return TernaryWeight(codes.reshape(shape), scale)


def _scale_of(d: torch.Tensor) -> torch.Tensor:
    """The PackedWeight scale: what unpacking the blocks yields, as float32 [1] or [out]."""
    _, scale = _stored_scale(d.float(), torch.zeros((*d.shape, 1), dtype=torch.int8))
    return scale.float().reshape(-1)


def unpack_tq_bytes(data: torch.Tensor, shape: tuple[int, int], layout: str) -> TernaryWeight:
    """Canonical ternary weight from TQ2_0 / TQ1_0 bytes of a [out, in] weight (any byte tensor shape)."""
    if layout == "tq2_0":
        return unpack_tq2_0_bytes(data, shape)
    if layout == "tq1_0":
        return unpack_tq1_0_bytes(data, shape)
    raise LayoutError(f"{layout!r} is not a TQ layout (tq2_0 or tq1_0)")


TQ2_0 = register_layout(
    Layout(
        "tq2_0",
        66 * 8 / QK,
        pack_tq2_0,
        lambda pw: unpack_tq2_0_bytes(pw.data, pw.shape),
        "GGUF TQ2_0: 2-bit codes in 256-weight blocks with an fp16 scale each (llama.cpp)",
    )
)
TQ1_0 = register_layout(
    Layout(
        "tq1_0",
        54 * 8 / QK,
        pack_tq1_0,
        lambda pw: unpack_tq1_0_bytes(pw.data, pw.shape),
        "GGUF TQ1_0: base-3, five trits per byte, 256-weight blocks with an fp16 scale each (llama.cpp)",
    )
)

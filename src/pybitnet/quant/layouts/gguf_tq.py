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

import numpy as np
import torch

from ...errors import LayoutError
from ..ternary import TernaryWeight
from .registry import Layout, PackedWeight, check_codes, register_layout

# The packing runs in numpy on uint8 (no wider copies of the weights): a 2B model packs in seconds.
QK = 256
BLOCK_BYTES = {"tq2_0": 66, "tq1_0": 54}
FP16_MAX = float(np.finfo(np.float16).max)


def check_tq_shape(shape: tuple[int, int], layout: str) -> None:
    if shape[1] % QK:
        raise LayoutError(
            f"{layout.upper()} packs rows in blocks of {QK} weights: in_features must be a multiple of {QK}, "
            f"got {shape[1]} (weight shape {list(shape)})"
        )


def row_bytes(cols: int, layout: str) -> int:
    return cols // QK * BLOCK_BYTES[layout]


def _block_codes_and_scales(tw: TernaryWeight, layout: str) -> tuple[np.ndarray, np.ndarray]:
    """(q = codes + 1 as uint8 [out, nb, 256], d [out, nb] fp16) as quants.py derives them from codes * scale:
    d is the block's absmax (|scale|, or 0 for an all-zero block) and a negative scale flips the codes."""
    check_codes(tw)
    check_tq_shape(tw.shape, layout)
    out, cols = tw.shape
    scale = np.broadcast_to(tw.scale.detach().float().cpu().numpy().reshape(-1), (out,))
    if not np.isfinite(scale).all():
        raise LayoutError(f"{layout.upper()} cannot store a non-finite scale")
    codes = np.ascontiguousarray(tw.codes.detach().cpu().numpy().astype(np.int8, copy=False))
    if (scale < 0).any():
        codes = codes * np.sign(scale).astype(np.int8)[:, None]
    nb = cols // QK
    used = codes.view(np.uint64).reshape(out, nb, QK // 8).any(-1)  # any nonzero code in the block
    with np.errstate(over="ignore"):  # a scale past fp16's range becomes inf, reported below
        d_row = np.abs(scale).astype(np.float16)
    lost = used.any(-1) & ((d_row == 0) | np.isinf(d_row))
    if lost.any():
        raise LayoutError(
            f"{layout.upper()} block scales are fp16: scale {np.abs(scale)[lost][0]:g} is outside fp16's "
            f"range (nonzero, at most {FP16_MAX:g})"
        )
    q = (codes.view(np.uint8) + np.uint8(1)).reshape(out, nb, QK)  # -1, 0, 1 -> 0, 1, 2 (uint8 wraps)
    return q, np.where(used, d_row[:, None], np.float16(0))


def _packed(layout: str, qs: np.ndarray, d: np.ndarray, shape: tuple[int, int]) -> PackedWeight:
    """Append each block's fp16 scale (2 little-endian bytes): [out, nb, k] codes -> [out, nb * (k + 2)]."""
    out, nb, _ = qs.shape
    data = np.concatenate((qs, d.astype("<f2").view(np.uint8).reshape(out, nb, 2)), axis=-1)
    return PackedWeight(layout, torch.from_numpy(data.reshape(out, -1)), _scale_of(d), shape)


def _stored_scale(d: np.ndarray, codes: np.ndarray) -> tuple[np.ndarray, torch.Tensor]:
    """(codes with blocks of d = 0 zeroed, canonical scale) from block scales d [out, nb] float32.

    A block whose d is 0 dequantizes to zeros whatever its codes say, so its codes are dropped. The remaining
    blocks must share one d per row; one d for the whole tensor gives a 0-d scale, else a per-row [out] one.
    Rows (or tensors) without any nonzero weight get scale 1: any scale represents them exactly.
    """
    if not np.isfinite(d).all():
        raise LayoutError("a block scale is not a finite number (corrupt data?)")
    present = d != 0
    if not present.all():
        codes = codes * present[..., None].astype(codes.dtype)
    d_hi = np.where(present, d, -np.inf).max(-1)
    d_lo = np.where(present, d, np.inf).min(-1)
    any_row = present.any(-1)
    mixed = any_row & (d_hi != d_lo)
    if mixed.any():
        row = int(np.flatnonzero(mixed)[0])
        raise LayoutError(
            f"{int(mixed.sum())} row(s) have blocks with different scales (row {row}: "
            f"{d_lo[row]:g} to {d_hi[row]:g}); a ternary weight holds one scale per tensor "
            "or per row, so this tensor was quantized from non-ternary values and cannot be loaded as "
            "BitNet weights"
        )
    row_scale = np.where(any_row, d_hi, 1.0).astype(np.float32)
    values = np.unique(row_scale[any_row])
    if values.size <= 1:
        return codes, torch.tensor(values[0] if values.size else 1.0, dtype=torch.float32)
    return codes, torch.from_numpy(row_scale)


def _split_blocks(data: torch.Tensor | np.ndarray, shape: tuple[int, int], layout: str) -> np.ndarray:
    check_tq_shape(shape, layout)
    out, cols = shape
    raw = data.detach().cpu().numpy() if isinstance(data, torch.Tensor) else np.asarray(data)
    expected = out * row_bytes(cols, layout)
    if raw.dtype != np.uint8 or raw.size != expected:
        raise LayoutError(
            f"{layout.upper()} data for a {out}x{cols} weight must be {expected} uint8 bytes, "
            f"got {raw.size} of {raw.dtype}"
        )
    return raw.reshape(out, cols // QK, BLOCK_BYTES[layout])


def _block_scales(blocks: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(blocks[..., -2:]).view("<f2")[..., 0].astype(np.float32)


def _ternary(codes_plus_one: np.ndarray, blocks: np.ndarray, shape: tuple[int, int]) -> TernaryWeight:
    codes = (codes_plus_one - np.uint8(1)).view(np.int8)  # 0, 1, 2 -> -1, 0, 1 (uint8 wraps)
    codes, scale = _stored_scale(_block_scales(blocks), codes.reshape(*blocks.shape[:2], QK))
    return TernaryWeight(torch.from_numpy(np.ascontiguousarray(codes).reshape(shape)), scale)


def pack_tq2_0(tw: TernaryWeight) -> PackedWeight:
    q, d = _block_codes_and_scales(tw, "tq2_0")
    out, nb, _ = q.shape
    q = q.reshape(out, nb, 2, 4, 32)
    qs = q[..., 0, :] | (q[..., 1, :] << 2) | (q[..., 2, :] << 4) | (q[..., 3, :] << 6)
    return _packed("tq2_0", qs.reshape(out, nb, 64), d, tw.shape)


def unpack_tq2_0_bytes(data: torch.Tensor | np.ndarray, shape: tuple[int, int]) -> TernaryWeight:
    blocks = _split_blocks(data, shape, "tq2_0")
    out, nb, _ = blocks.shape
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(4, 1)
    q = (blocks[..., :64].reshape(out, nb, 2, 1, 32) >> shifts) & np.uint8(3)
    if (q == 3).any():
        raise LayoutError("TQ2_0 data holds the 2-bit code 3, which is not a ternary value (corrupt data?)")
    return _ternary(q, blocks, shape)


def pack_tq1_0(tw: TernaryWeight) -> PackedWeight:
    q, d = _block_codes_and_scales(tw, "tq1_0")
    out, nb, _ = q.shape

    def base3(trits: np.ndarray) -> np.ndarray:  # [..., k, m] -> [..., m], the first trit most significant
        v = np.zeros(trits.shape[:-2] + trits.shape[-1:], dtype=np.uint8)
        for k in range(trits.shape[-2]):
            v = v * np.uint8(3) + trits[..., k, :]  # at most 242: no uint8 overflow
        return v

    qs0 = base3(q[..., :160].reshape(out, nb, 5, 32))
    qs1 = base3(q[..., 160:240].reshape(out, nb, 5, 16))
    qh = base3(q[..., 240:].reshape(out, nb, 4, 4)) * np.uint8(3)  # four trits, shifted up one place
    v = np.concatenate((qs0, qs1, qh), axis=-1).astype(np.uint16)
    qs = ((v * 256 + 242) // 243).astype(np.uint8)  # ceil(v * 256 / 243)
    return _packed("tq1_0", qs, d, tw.shape)


def _trits(packed: np.ndarray, n: int) -> np.ndarray:
    """[..., m] bytes -> [..., n, m] trits (0..2): multiplying by 3^k (mod 256) moves trit k to the top, where
    (x * 3) >> 8 reads it."""
    mult = (3 ** np.arange(n, dtype=np.uint8)).reshape(n, 1)
    return ((packed[..., None, :] * mult).astype(np.uint16) * 3 >> 8).astype(np.uint8)


def unpack_tq1_0_bytes(data: torch.Tensor | np.ndarray, shape: tuple[int, int]) -> TernaryWeight:
    blocks = _split_blocks(data, shape, "tq1_0")
    out, nb, _ = blocks.shape
    t0 = _trits(blocks[..., :32], 5).reshape(out, nb, 160)
    t1 = _trits(blocks[..., 32:48], 5).reshape(out, nb, 80)
    t2 = _trits(blocks[..., 48:52], 4).reshape(out, nb, 16)
    return _ternary(np.concatenate((t0, t1, t2), axis=-1), blocks, shape)


def _scale_of(d: np.ndarray) -> torch.Tensor:
    """The PackedWeight scale: what unpacking the blocks yields, as float32 [1] or [out]."""
    _, scale = _stored_scale(d.astype(np.float32), np.zeros((*d.shape, 1), dtype=np.int8))
    return scale.reshape(-1)


def unpack_tq_bytes(data: torch.Tensor | np.ndarray, shape: tuple[int, int], layout: str) -> TernaryWeight:
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

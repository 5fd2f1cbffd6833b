"""bitnet.cpp I2_S layout (x86 builds: 128-value blocks).

The whole [out, in] tensor is flattened row-major and cut into blocks of 128 values, 32 bytes each, of 2-bit
codes q = w + 1: byte b of a block holds elements b, b+32, b+64, b+96 at bits 7-6, 5-4, 3-2, 1-0 (highest pair
first). After the n / 4 code bytes come one float32 scale (the tensor's max |W|, i.e. its ternary scale) and
zero padding to 32 bytes: n / 4 + 32 bytes in all. (ARM builds of bitnet.cpp use 64-value blocks; files from
them differ.)

PackedWeight for this layout: `data` is the flat uint8 tensor of n / 4 + 32 bytes as the file stores it;
`scale` is float32 [1], the stored scale. I2_S has one scale per tensor, so per-row scales cannot be packed.
"""

from __future__ import annotations

import numpy as np
import torch

from ...errors import LayoutError
from ..ternary import TernaryWeight
from .registry import Layout, PackedWeight, check_codes, register_layout

QK_I2_S = 128
TAIL_BYTES = 32  # float32 scale + padding


def i2s_nbytes(n: int) -> int:
    return n // 4 + TAIL_BYTES


def check_i2s_shape(shape: tuple[int, int]) -> None:
    n = shape[0] * shape[1]
    if n % QK_I2_S:
        raise LayoutError(
            f"I2_S packs the flattened tensor in blocks of {QK_I2_S} values: out * in must be a multiple of "
            f"{QK_I2_S}, got {shape[0]} x {shape[1]} = {n}"
        )


def pack_i2s(tw: TernaryWeight) -> PackedWeight:
    check_codes(tw)
    check_i2s_shape(tw.shape)
    scale = tw.scale.detach().float().cpu().numpy().reshape(-1)
    if scale.size > 1 and not (scale == scale[0]).all():
        raise LayoutError("I2_S holds one scale per tensor; this weight has a different scale per row")
    s = scale[0]
    if not np.isfinite(s):
        raise LayoutError("I2_S cannot store a non-finite scale")
    # as bitnet.cpp quantizes codes * s: scale = max|W| >= 0, any sign moved into the codes
    codes = tw.codes.detach().cpu().numpy().astype(np.int8, copy=False)
    if s < 0:
        codes = -codes
    q = (np.ascontiguousarray(codes).view(np.uint8) + np.uint8(1)).reshape(-1, 4, 32)  # uint8 wraps -1 to 0
    qs = (q[:, 0] << 6) | (q[:, 1] << 4) | (q[:, 2] << 2) | q[:, 3]
    tail = np.zeros(TAIL_BYTES, dtype=np.uint8)
    tail[:4] = np.array([abs(s)], dtype="<f4").view(np.uint8)
    data = torch.from_numpy(np.concatenate((qs.reshape(-1), tail)))
    return PackedWeight("i2s", data, torch.tensor([abs(s)], dtype=torch.float32), tw.shape)


def unpack_i2s_bytes(data: torch.Tensor | np.ndarray, shape: tuple[int, int]) -> TernaryWeight:
    """Canonical ternary weight from the n / 4 + 32 I2_S bytes of a [out, in] weight."""
    check_i2s_shape(shape)
    n = shape[0] * shape[1]
    raw = data.detach().cpu().numpy() if isinstance(data, torch.Tensor) else np.asarray(data)
    if raw.dtype != np.uint8 or raw.size != i2s_nbytes(n):
        raise LayoutError(
            f"I2_S data for a {shape[0]}x{shape[1]} weight must be {i2s_nbytes(n)} uint8 bytes, "
            f"got {raw.size} of {raw.dtype}"
        )
    flat = raw.reshape(-1)
    shifts = np.array([6, 4, 2, 0], dtype=np.uint8).reshape(1, 4, 1)
    q = (flat[: n // 4].reshape(-1, 1, 32) >> shifts) & np.uint8(3)
    if (q == 3).any():
        raise LayoutError("I2_S data holds the 2-bit code 3, which is not a ternary value (corrupt data?)")
    scale = np.ascontiguousarray(flat[n // 4 : n // 4 + 4]).view("<f4")[0]
    if not np.isfinite(scale):
        raise LayoutError(f"I2_S scale {scale} is not a finite number (corrupt data?)")
    codes = (q - np.uint8(1)).view(np.int8).reshape(shape)  # uint8 wraps 0 to -1
    return TernaryWeight(torch.from_numpy(codes), torch.tensor(float(scale), dtype=torch.float32))


I2S = register_layout(
    Layout(
        "i2s",
        2.0,
        pack_i2s,
        lambda pw: unpack_i2s_bytes(pw.data, pw.shape),
        "bitnet.cpp I2_S (x86): 2-bit codes in 128-value blocks, one float32 scale per tensor",
    )
)

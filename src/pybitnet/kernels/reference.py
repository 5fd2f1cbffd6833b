"""The reference kernel: integer-exact ternary linear in plain torch, valid on any device. It defines truth.

Weights stay in the 2-bit HF packed layout and are unpacked per call, a quarter at a time, so a loaded model
costs little more memory than its checkpoint.
"""

from __future__ import annotations

import torch

from ..errors import LayoutError
from ..quant.activations import quantize_activations
from ..quant.layouts import PackedWeight
from .registry import Kernel, register_kernel

# An int8 x ternary dot product over K terms is an integer of magnitude <= 128 * K; with the stored codes
# w + 1 in {0, 1, 2} it is <= 256 * K. Every partial sum is exact in float32 while that stays below 2**24,
# i.e. for K <= 65536, whatever order the matmul sums in.
MAX_EXACT_FP32_K = 2**24 // 256


def _exact_float_dtype(k: int, device: torch.device) -> torch.dtype:
    tf32 = device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32
    if k > MAX_EXACT_FP32_K or tf32 or torch.get_float32_matmul_precision() != "highest":
        return torch.float64
    return torch.float32


def ternary_matmul_int(xq: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Exact int32 accumulation of int8 activations [..., K] times ternary codes [N, K] -> [..., N]."""
    dtype = _exact_float_dtype(codes.shape[1], xq.device)
    return torch.matmul(xq.to(dtype), codes.to(dtype).T).to(torch.int32)


def packed_matmul_int(xq: torch.Tensor, packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """Exact int32 accumulation of int8 activations [..., K] times HF-packed ternary weights -> [..., N].

    Unpacks one 2-bit row block at a time (a quarter of the rows), so the transient float copy is a quarter of
    the weight, and uses x·(w + 1) - Σx to skip the subtraction of 1 from every code.
    """
    rows = packed.shape[0]
    dtype = _exact_float_dtype(packed.shape[1], xq.device)
    xf = xq.to(dtype)
    acc = torch.empty((*xq.shape[:-1], out_features), dtype=dtype, device=xq.device)
    for block in range(4):
        lo, hi = block * rows, min((block + 1) * rows, out_features)
        if lo >= hi:
            break
        codes_plus_one = ((packed[: hi - lo] >> (2 * block)) & 3).to(dtype)
        acc[..., lo:hi] = torch.matmul(xf, codes_plus_one.T)
    return (acc - xf.sum(-1, keepdim=True)).to(torch.int32)


def scale_output(
    acc: torch.Tensor, w_scale: torch.Tensor, a: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """y = acc * s / a in float32, then cast; `w_scale` is per tensor or per output row."""
    return (acc.to(torch.float32) * (w_scale.to(torch.float32) / a)).to(dtype)


def reference_linear(x: torch.Tensor, w: PackedWeight) -> torch.Tensor:
    out, cols = w.shape
    if w.data.dtype != torch.uint8 or tuple(w.data.shape) != (-(-out // 4), cols):
        raise LayoutError(
            f"the reference kernel takes HF packed uint8 [{-(-out // 4)}, {cols}] for a {out}x{cols} weight, "
            f"got {w.data.dtype} {tuple(w.data.shape)} (layout {w.layout!r}); "
            "prepare the weight with the kernel"
        )
    if x.shape[-1] != cols:
        raise LayoutError(f"input has {x.shape[-1]} features but the weight expects {cols}")
    xq, a = quantize_activations(x)
    return scale_output(packed_matmul_int(xq, w.data, w.shape[0]), w.scale, a, x.dtype)


REFERENCE = register_kernel(
    Kernel(
        name="reference",
        device_type="any",
        layout="hf",
        linear=reference_linear,
        priority=0,
        description="torch, integer-exact, unpacks the 2-bit weights per call (a quarter at a time)",
    )
)

"""The reference kernel: integer-exact ternary linear in plain torch, valid on any device. It defines truth.

Weights stay in the 2-bit HF packed layout and are unpacked per call, so a loaded model costs no more memory
than its checkpoint.
"""

from __future__ import annotations

import torch

from ..quant.activations import quantize_activations
from ..quant.layouts import PackedWeight
from ..quant.layouts.hf import unpack_rows
from .registry import Kernel, register_kernel

# An int8 x ternary dot product over K terms is an integer of magnitude <= 128 * K. Every partial sum is exact
# in float32 while that stays below 2**24, i.e. for K <= 131072, whatever order the matmul sums in.
MAX_EXACT_FP32_K = 2**24 // 128


def _exact_float_dtype(k: int, device: torch.device) -> torch.dtype:
    tf32 = device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32
    if k > MAX_EXACT_FP32_K or tf32 or torch.get_float32_matmul_precision() != "highest":
        return torch.float64
    return torch.float32


def ternary_matmul_int(xq: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Exact int32 accumulation of int8 activations [..., K] times ternary codes [N, K] -> [..., N]."""
    dtype = _exact_float_dtype(codes.shape[1], xq.device)
    return torch.matmul(xq.to(dtype), codes.to(dtype).T).to(torch.int32)


def scale_output(acc: torch.Tensor, w_scale: torch.Tensor, a: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """y = acc * s / a in float32, then cast; `w_scale` is per tensor or per output row."""
    return (acc.to(torch.float32) * (w_scale.to(torch.float32) / a)).to(dtype)


def reference_linear(x: torch.Tensor, w: PackedWeight) -> torch.Tensor:
    codes = unpack_rows(w.data, w.shape[0])
    xq, a = quantize_activations(x)
    return scale_output(ternary_matmul_int(xq, codes), w.scale, a, x.dtype)


REFERENCE = register_kernel(
    Kernel(
        name="reference",
        device_type="any",
        layout="hf",
        linear=reference_linear,
        priority=0,
        description="torch, integer-exact, unpacks the 2-bit weights per call",
    )
)

"""Triton GPU kernels for ternary models, registered as the "triton" kernel (CUDA, above the reference).

The kernel modules import Triton when first used, so importing pybitnet never needs Triton, and tests can set
TRITON_INTERPRET=1 before the kernels are compiled to run them on the CPU.
"""

from __future__ import annotations

import importlib.util

import torch

from ...quant.layouts import PackedWeight
from ..registry import Kernel, register_kernel

LAYOUT = "triton_i2"


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def available() -> bool:
    return triton_installed() and torch.cuda.is_available()


def triton_linear(x: torch.Tensor, w: PackedWeight) -> torch.Tensor:
    """y = x @ W.T with per-token int8 activations: one fused launch for one row, else quantize, then the
    tensor-core GEMM."""
    from .matmul import ternary_gemv, ternary_mm
    from .quant import norm_quant

    rows = x.reshape(-1, x.shape[-1])
    if rows.shape[0] == 0:
        return x.new_empty((*x.shape[:-1], w.shape[0]))
    if rows.shape[0] == 1:
        y = ternary_gemv(rows, w, out_dtype=x.dtype)
    else:
        xq, a, _ = norm_quant(rows)
        y = ternary_mm(xq, a, w, out_dtype=x.dtype)
    return y.reshape(*x.shape[:-1], w.shape[0])


TRITON = register_kernel(
    Kernel(
        name="triton",
        device_type="cuda",
        layout=LAYOUT,
        linear=triton_linear,
        priority=20,
        isa="triton",
        is_available=available,
        description="Triton: W2A8 GEMV (dp4a), int8 tensor-core GEMM, integer-exact; needs CUDA and triton",
    )
)

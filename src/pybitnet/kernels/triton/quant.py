"""Fused RMSNorm + per-token int8 activation quantization, one row per program.

Matches `RMSNorm` (float32 statistics, the normalized row cast to the activation dtype, times the gain in that
dtype; the sum of squares is added in another order than torch's, so a last bit may differ) followed by
`quantize_activations` (a = 127 / max|y|, round half to even, clamp) value for value.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (
    ACTIVATIONS,
    absmax_scale,
    gated_activation,
    launch_kwargs,
    on_gpu,
    pdl_gate,
    pdl_launch,
    quantize_i8,
    round_to,
)


@triton.jit
def rms_inverse(x, k, eps):
    """1 / sqrt(mean(x²) + eps) of a float32 row x [KB] (zeros past its k values), each step IEEE-rounded."""
    return rms_inverse_of_sum(tl.sum(x * x, axis=0), k, eps)


@triton.jit
def rms_inverse_of_sum(sum_sq, k, eps):
    """1 / sqrt(sum_sq / k + eps), each step IEEE-rounded."""
    ms = tl.math.div_rn(sum_sq, k.to(tl.float32))
    return tl.math.div_rn(tl.zeros_like(ms) + 1.0, tl.sqrt_rn(ms + eps))


@triton.jit
def rms_apply(x, r, g, XDT: tl.constexpr, NATIVE: tl.constexpr):
    """RMSNorm's output as the reference rounds it: (x * r) cast to XDT, times the gain g in XDT."""
    return round_to(g * round_to(x * r, XDT, NATIVE), XDT, NATIVE)


@triton.jit
def load_norm_quant(x_ptr, g_ptr, offs, mask, K, eps, NORM: tl.constexpr, L2_ONLY: tl.constexpr,
                    NATIVE: tl.constexpr):  # fmt: skip
    """(int8 row, scale a) of the float row x[offs] (K values): RMSNorm with gain g when NORM, then per-token
    absmax quantization. L2_ONLY reads past the L1 cache (rows other programs of the launch just wrote)."""
    if L2_ONLY:
        raw = tl.load(x_ptr + offs, mask=mask, other=0.0, cache_modifier=".cg")
    else:
        raw = tl.load(x_ptr + offs, mask=mask, other=0.0)
    y = raw.to(tl.float32)
    if NORM:
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        y = rms_apply(y, rms_inverse(y, K, eps), g, raw.dtype, NATIVE)
    a = absmax_scale(tl.max(tl.abs(y), axis=0))
    return quantize_i8(y, a, NATIVE), a


@triton.jit
def _norm_quant_kernel(
    x_ptr,
    g_ptr,
    q_ptr,
    a_ptr,
    y_ptr,
    K,
    stride_x,
    stride_q,
    stride_y,
    eps,
    BLOCK: tl.constexpr,
    NORM: tl.constexpr,
    ACT: tl.constexpr,
    QUANT: tl.constexpr,
    STORE_FLOAT: tl.constexpr,
    NATIVE: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl_gate(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < K
    x_raw = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    y = x_raw.to(tl.float32)
    if ACT != 0:  # the row holds gate then up: the input is act(gate) * up
        up = tl.load(x_ptr + row * stride_x + K + offs, mask=mask, other=0.0).to(tl.float32)
        y = gated_activation(y, up, ACT, x_raw.dtype, NATIVE)
    if NORM:
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        y = rms_apply(y, rms_inverse(y, K, eps), g, x_raw.dtype, NATIVE)
    if STORE_FLOAT:
        tl.store(y_ptr + row * stride_y + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
    if QUANT:
        a = absmax_scale(tl.max(tl.abs(y), axis=0))
        tl.store(q_ptr + row * stride_q + offs, quantize_i8(y, a, NATIVE), mask=mask)
        tl.store(a_ptr + row, a)


def norm_quant(
    x: torch.Tensor,
    gain: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    act: str | None = None,
    quant: bool = True,
    store_float: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """x [M, K] float -> (xq int8 [M, K], a float32 [M], y [M, K] in x's dtype).

    With `act` ("relu2", "silu") x is [M, 2K], gate then up, and the row is act(gate) * up first; with `gain`,
    RMSNorm follows; then int8 quantization (`quant`) and/or the float rows themselves (`store_float`)."""
    m, width = x.shape
    k = width // 2 if act else width
    if x.stride(1) != 1:
        x = x.contiguous()
    xq = torch.empty((m, k), dtype=torch.int8, device=x.device) if quant else None
    a = torch.empty((m,), dtype=torch.float32, device=x.device) if quant else None
    y = torch.empty((m, k), dtype=x.dtype, device=x.device) if store_float else None
    block = triton.next_power_of_2(k)
    _norm_quant_kernel[(m,)](
        x,
        gain if gain is not None else x,
        xq if quant else x,
        a if quant else x,
        y if store_float else x,
        k,
        x.stride(0),
        k,
        k,
        eps,
        BLOCK=block,
        NORM=gain is not None,
        ACT=ACTIVATIONS[act] if act else 0,
        QUANT=quant,
        STORE_FLOAT=store_float,
        NATIVE=on_gpu(x),
        num_warps=max(1, min(16, block // 512)),
        **launch_kwargs(pdl_launch(x)),
    )
    return xq, a, y

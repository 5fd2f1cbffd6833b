"""BitLinear training on int8 tensor cores (Triton): the forward product runs as int8 x int8 -> int32, and the
backward reads int8 activations saved instead of float ones.

Forward: per-token absmax int8 activations and absmean ternary codes come from the same torch functions as the
reference path (so the codes are bit-identical, and torch.compile fuses them into the neighbouring norm and
cast kernels); one Triton int8 GEMM then accumulates exactly in int32 and applies s / a per row in its
epilogue, like the integer reference kernel. Backward (straight-through): grad_x = g @ (codes * s) and
grad_w = g^T @ (xq / a), from the saved int8 tensors.

The GEMM is a torch.library custom op with a fake implementation and an autograd formula, so torch.compile
captures it without graph breaks. It applies at full quantization only (λ = 1 for weights and activations);
the trainer switches layers to it when λ reaches 1, from Python floats (no host sync). With TRITON_INTERPRET=1
the kernel runs on CPU tensors, which is how CI tests it.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from ..nn import BitLinear
from ..quant.activations import quantize_activations
from ..quant.ternary import absmean_scale, ternarize


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _int8_matmul_kernel(
        a_ptr, b_ptr, c_ptr, f_ptr, M, N, K,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    ):  # fmt: skip
        """C[M, N] = (A[M, K] int8 @ B[N, K]^T int8, accumulated in int32) * f[m], stored in C's dtype."""
        pid = tl.program_id(0)
        num_m, num_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
        group = pid // (GROUP_M * num_n)  # grouped ordering keeps a band of A in L2
        first_m = group * GROUP_M
        size_m = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % (GROUP_M * num_n)) % size_m
        pid_n = (pid % (GROUP_M * num_n)) // size_m
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        a_rows = a_ptr + rm.to(tl.int64)[:, None] * K
        b_rows = b_ptr + rn.to(tl.int64)[None, :] * K
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for k in range(0, K, BLOCK_K):
            kk = k + rk
            a = tl.load(a_rows + kk[None, :], mask=(rm[:, None] < M) & (kk[None, :] < K), other=0)
            b = tl.load(b_rows + kk[:, None], mask=(rn[None, :] < N) & (kk[:, None] < K), other=0)
            acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        f = tl.load(f_ptr + rm, mask=rm < M, other=0.0)
        c = acc.to(tl.float32) * f[:, None]
        mask = (rm[:, None] < M) & (rn[None, :] < N)
        tl.store(c_ptr + rm.to(tl.int64)[:, None] * N + rn[None, :], c.to(c_ptr.dtype.element_ty), mask=mask)

    _GPU_CONFIGS = [
        triton.Config(
            {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8}, num_stages=4, num_warps=8
        ),
        triton.Config(
            {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 128, "GROUP_M": 8}, num_stages=3, num_warps=8
        ),
        triton.Config(
            {"BLOCK_M": 256, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8}, num_stages=3, num_warps=8
        ),
        triton.Config(
            {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 8}, num_stages=4, num_warps=4
        ),
        triton.Config(
            {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 256, "GROUP_M": 8}, num_stages=3, num_warps=4
        ),
    ]
    _int8_matmul_tuned = triton.autotune(_GPU_CONFIGS, key=["M", "N", "K"])(_int8_matmul_kernel)


def int8_matmul(
    xq: torch.Tensor, wq: torch.Tensor, row_scale: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """(xq [M, K] int8 @ wq [N, K]^T int8, exact in int32) * row_scale [M] (float32), as `dtype`."""
    m, k = xq.shape
    n = wq.shape[0]
    out = torch.empty((m, n), dtype=dtype, device=xq.device)
    if m == 0:
        return out
    if xq.is_cuda and not _interpret():
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
        _int8_matmul_tuned[grid](xq, wq, out, row_scale, m, n, k)
    else:
        bm = bn = bk = 32
        grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
        _int8_matmul_kernel[grid](
            xq, wq, out, row_scale, m, n, k, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=4
        )
    return out


@torch.library.custom_op("pybitnet::bitlinear_int8", mutates_args=())
def _bitlinear_int8(
    x: torch.Tensor,
    w: torch.Tensor,
    xq: torch.Tensor,
    a: torch.Tensor,
    wq: torch.Tensor,
    s: torch.Tensor,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """y [M, N] = (xq @ wq^T) * s / a. `x` and `w` (the latent inputs) only route the straight-through
    gradients; the forward reads the int8 tensors and their scales (a [M], s [1], float32)."""
    return int8_matmul(xq.contiguous(), wq.contiguous(), (s / a).contiguous(), out_dtype)


@_bitlinear_int8.register_fake
def _(x, w, xq, a, wq, s, out_dtype):
    return x.new_empty((x.shape[0], w.shape[0]), dtype=out_dtype)


def _setup_context(ctx, inputs, output):
    x, w, xq, a, wq, s, _ = inputs
    ctx.save_for_backward(xq, a, wq, s)  # int8 activations, not float ones
    ctx.x_dtype, ctx.w_dtype = x.dtype, w.dtype


def _backward(ctx, g):
    xq, a, wq, s = ctx.saved_tensors
    grad_x = (g @ wq.to(g.dtype)) * s.to(g.dtype)
    x_deq = (xq.float() / a[:, None]).to(g.dtype)  # the fake-quantized input, as the reference path has it
    grad_w = g.t() @ x_deq
    return grad_x.to(ctx.x_dtype), grad_w.to(ctx.w_dtype), None, None, None, None, None


_bitlinear_int8.register_autograd(_backward, setup_context=_setup_context)


def fused_bitlinear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = BitLinear(x) at λ = 1 with the int8 GEMM. x [..., K], w [N, K] (latent float weights)."""
    autocast = x.is_cuda and torch.is_autocast_enabled("cuda")
    dtype = torch.get_autocast_dtype("cuda") if autocast else x.dtype
    x2 = x.reshape(-1, x.shape[-1])
    xq, a = quantize_activations(x2)  # as the reference path: in the dtype x arrives in
    s = absmean_scale(w)
    wq = ternarize(w.detach(), s).to(torch.int8)
    y = _bitlinear_int8(x2, w, xq, a.reshape(-1), wq, s.reshape(1), dtype)
    y = y.reshape(*x.shape[:-1], w.shape[0])
    return y if bias is None else y + bias.to(y.dtype)


class FusedBitLinear(BitLinear):
    """BitLinear whose forward runs on the int8 GEMM whenever `fused` is set (the trainer sets it once λ is 1
    for weights and activations); otherwise the reference straight-through path."""

    fused: bool = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fused:
            return super().forward(x)
        if self.input_norm is not None:
            x = self.input_norm(x)
        return fused_bitlinear(x, self.weight, self.bias)


def use_fused_kernels(model: nn.Module) -> int:
    """Turn every BitLinear of `model` into a FusedBitLinear (same parameters, buffers); return the count."""
    if not triton_available():
        return 0
    count = 0
    for m in model.modules():
        if (
            type(m) is BitLinear
        ):  # a class swap keeps the parameters, buffers and state-dict names as they are
            m.__class__ = FusedBitLinear
            count += 1
    return count


def set_fused(model: nn.Module, enabled: bool) -> None:
    for m in model.modules():
        if isinstance(m, FusedBitLinear):
            m.fused = enabled


__all__ = [
    "FusedBitLinear",
    "fused_bitlinear",
    "int8_matmul",
    "set_fused",
    "triton_available",
    "use_fused_kernels",
]

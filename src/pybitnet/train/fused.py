"""Fused BitLinear training kernels (Triton) for GPUs: int8 tensor cores in the forward, int8 activations saved
for the backward.

Forward: per-token absmax int8 activations and absmean ternary weights (int8 codes), then one int8 x int8 -> int32
matmul with the two scales applied in its epilogue. The product is exact in int32, so the result equals the
fake-quantized float path up to the final float rounding. Backward (straight-through): grad_x = g @ (codes * s)
and grad_w = g^T @ (xq / a), from the saved int8 tensors, in the gradient's dtype on cuBLAS.

The op is a torch.library custom op with a fake implementation and an autograd formula, so torch.compile
captures it without graph breaks. It only applies at full quantization (λ = 1 for weights and activations); the
trainer switches layers to it when λ reaches 1 (from Python floats, no host sync). With TRITON_INTERPRET=1 the
kernels run on CPU tensors, which is how CI tests them.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from ..nn import BitLinear
from ..quant.ternary import SCALE_EPS


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

    _ACT_EPS = tl.constexpr(1e-5)
    _ROUND_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2**23: x + M - M rounds float32 |x| < 2**22, ties to even

    @triton.jit
    def _round_even(x):  # launch with enable_fp_fusion=False: an FMA would skip rounding the product first
        return (x + _ROUND_MAGIC) - _ROUND_MAGIC

    @triton.jit
    def _quantize_rows_kernel(x_ptr, xq_ptr, inv_ptr, K, stride_x, BLOCK_K: tl.constexpr):
        """One program per row: a = 127 / max(|x|, eps); xq = clamp(round(x * a), -128, 127); stores 1/a."""
        row = tl.program_id(0)
        x_row = x_ptr + row.to(tl.int64) * stride_x
        amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            offs = k + tl.arange(0, BLOCK_K)
            x = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
        a = tl.math.div_rn(127.0, tl.maximum(tl.max(amax, axis=0), _ACT_EPS))  # IEEE division, as torch
        for k in range(0, K, BLOCK_K):
            offs = k + tl.arange(0, BLOCK_K)
            x = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
            q = tl.minimum(tl.maximum(_round_even(x * a), -128.0), 127.0)
            tl.store(xq_ptr + row.to(tl.int64) * K + offs, q.to(tl.int8), mask=offs < K)
        tl.store(inv_ptr + row, tl.math.div_rn(1.0, a))

    @triton.jit
    def _ternarize_kernel(w_ptr, s_ptr, wq_ptr, numel, BLOCK: tl.constexpr):
        """codes = clamp(round(w * (1 / s)), -1, 1) with s = mean|W| read from device memory (no host sync)."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inv_s = tl.math.div_rn(1.0, tl.load(s_ptr))
        w = tl.load(w_ptr + offs, mask=offs < numel, other=0.0).to(tl.float32)
        q = tl.minimum(tl.maximum(_round_even(w * inv_s), -1.0), 1.0)
        tl.store(wq_ptr + offs, q.to(tl.int8), mask=offs < numel)

    @triton.jit
    def _int8_matmul_kernel(
        a_ptr, b_ptr, c_ptr, inv_ptr, s_ptr, M, N, K,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    ):  # fmt: skip
        """C[M, N] = (A[M, K] int8 @ B[N, K]^T int8, accumulated in int32) * inv[m] * s, stored in C's dtype."""
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
        scale = tl.load(inv_ptr + rm, mask=rm < M, other=0.0) * tl.load(s_ptr)
        c = acc.to(tl.float32) * scale[:, None]
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


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (int8 codes [M, K], 1/a float32 [M]) with per-row absmax scaling."""
    m, k = x.shape
    xq = torch.empty((m, k), dtype=torch.int8, device=x.device)
    inv = torch.empty((m,), dtype=torch.float32, device=x.device)
    if m:
        block = min(1024, triton.next_power_of_2(k))
        _quantize_rows_kernel[(m,)](x, xq, inv, k, x.stride(0), BLOCK_K=block, enable_fp_fusion=False)
    return xq, inv


def ternarize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (int8 codes [N, K], s float32 [1] = mean|W|); s stays on the device."""
    s = w.detach().float().abs().mean().clamp(min=SCALE_EPS).reshape(1)
    wq = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    block = 1024
    grid = (triton.cdiv(w.numel(), block),)
    _ternarize_kernel[grid](w.contiguous(), s, wq, w.numel(), BLOCK=block, enable_fp_fusion=False)
    return wq, s


def int8_linear(
    xq: torch.Tensor, inv: torch.Tensor, wq: torch.Tensor, s: torch.Tensor, dtype
) -> torch.Tensor:
    m, k = xq.shape
    n = wq.shape[0]
    out = torch.empty((m, n), dtype=dtype, device=xq.device)
    if xq.is_cuda and not _interpret():
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
        _int8_matmul_tuned[grid](xq, wq, out, inv, s, m, n, k)
    else:
        bm, bn, bk = 32, 32, 32
        grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
        _int8_matmul_kernel[grid](xq, wq, out, inv, s, m, n, k, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=4)
    return out


@torch.library.custom_op("pybitnet::bitlinear_train", mutates_args=())
def _bitlinear_train(
    x: torch.Tensor, w: torch.Tensor, out_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, xq, 1/a, codes, s) for x [M, K] and latent w [N, K]."""
    xq, inv = quantize_rows(x.contiguous())
    wq, s = ternarize(w)
    return int8_linear(xq, inv, wq, s, out_dtype), xq, inv, wq, s


@_bitlinear_train.register_fake
def _(x, w, out_dtype):
    m, k = x.shape
    n = w.shape[0]
    return (
        x.new_empty((m, n), dtype=out_dtype),
        x.new_empty((m, k), dtype=torch.int8),
        x.new_empty((m,), dtype=torch.float32),
        w.new_empty((n, k), dtype=torch.int8),
        w.new_empty((1,), dtype=torch.float32),
    )


def _setup_context(ctx, inputs, output):
    x, w, _ = inputs
    _, xq, inv, wq, s = output
    ctx.save_for_backward(xq, inv, wq, s)
    ctx.x_dtype, ctx.w_dtype = x.dtype, w.dtype
    ctx.mark_non_differentiable(*output[1:])


def _backward(ctx, grad_y, *_):
    xq, inv, wq, s = ctx.saved_tensors
    g = grad_y
    grad_x = (g @ wq.to(g.dtype)) * s.to(g.dtype)  # STE through the activation quantizer
    x_deq = xq.to(g.dtype) * inv.to(g.dtype)[:, None]
    grad_w = (
        g.t() @ x_deq
    )  # STE through the weight quantizer: the latent weight gets the ternary weight's grad
    return grad_x.to(ctx.x_dtype), grad_w.to(ctx.w_dtype), None


_bitlinear_train.register_autograd(_backward, setup_context=_setup_context)


def fused_bitlinear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = BitLinear(x) at λ = 1, on the fused kernels. x [..., K], w [N, K] (latent float weights)."""
    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") and x.is_cuda else x.dtype
    x2 = x.reshape(-1, x.shape[-1])
    y = _bitlinear_train(x2.to(dtype) if x2.dtype != dtype else x2, w, dtype)[0]
    y = y.reshape(*x.shape[:-1], w.shape[0])
    return y if bias is None else y + bias.to(y.dtype)


class FusedBitLinear(BitLinear):
    """BitLinear whose forward runs the fused kernels whenever `fused` is set (the trainer sets it once λ is 1
    for weights and activations); otherwise the reference straight-through path."""

    fused: bool = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fused:
            return super().forward(x)
        if self.input_norm is not None:
            x = self.input_norm(x)
        return fused_bitlinear(x, self.weight, self.bias)


def use_fused_kernels(model: nn.Module) -> int:
    """Turn every BitLinear of `model` into a FusedBitLinear (same parameters and buffers); returns how many."""
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


__all__ = ["FusedBitLinear", "fused_bitlinear", "set_fused", "triton_available", "use_fused_kernels"]

"""The int8 GEMM of BitLinear training: C[M, N] = (A[M, K] int8 @ B[N, K]^T int8, exact in int32) * s / a,
with a [M] a per-row and s [N] a per-column scale.

One Triton kernel (grouped tile order, int32 accumulation, the s / a rescale in the epilogue), exposed as
the custom op `pybitnet::int8_mm` so torch.compile captures it without a graph break, in forward and backward
graphs alike. On CUDA it is autotuned; with TRITON_INTERPRET=1 it runs on CPU tensors with small tiles (how
CI tests it); on CPU without the interpreter it falls back to torch._int_mm, integer-exact as well. The kernel
is jitted at first use, not at import, because Triton picks interpreter or compiler when a function is jitted:
a test can then set TRITON_INTERPRET=1 after something else imported this module.
"""

from __future__ import annotations

import functools
import os

import torch


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

    def _int8_matmul_kernel(
        a_ptr, b_ptr, c_ptr, ra_ptr, cs_ptr, M, N, K,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    ):  # fmt: skip
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
        # Rows past the edge wrap onto real rows (their results are never stored), so only K needs a load
        # mask; with the contiguity hints the tile loads stay wide. ~15% faster than masking rows on the H200.
        rm_load = tl.max_contiguous(tl.multiple_of(rm % M, BLOCK_M), BLOCK_M)
        rn_load = tl.max_contiguous(tl.multiple_of(rn % N, BLOCK_N), BLOCK_N)
        a_ptrs = a_ptr + rm_load.to(tl.int64)[:, None] * K + rk[None, :]
        b_ptrs = b_ptr + rn_load.to(tl.int64)[None, :] * K + rk[:, None]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            a = tl.load(a_ptrs, mask=rk[None, :] < K - k * BLOCK_K, other=0)
            b = tl.load(b_ptrs, mask=rk[:, None] < K - k * BLOCK_K, other=0)
            acc = tl.dot(a, b, acc, out_dtype=tl.int32)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K
        # the reference's epilogue acc * (s / a): one rounded quotient per element, then one rounded product
        ra = tl.load(ra_ptr + rm, mask=rm < M, other=1.0)
        cs = tl.load(cs_ptr + rn, mask=rn < N, other=0.0)
        s2, a2 = tl.broadcast(cs[None, :], ra[:, None])
        c = acc.to(tl.float32) * tl.math.div_rn(s2, a2)
        mask = (rm[:, None] < M) & (rn[None, :] < N)
        tl.store(c_ptr + rm.to(tl.int64)[:, None] * N + rn[None, :], c.to(c_ptr.dtype.element_ty), mask=mask)

    _GPU_CONFIGS = [
        triton.Config(
            {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_stages=st, num_warps=wp
        )
        for bm, bn, bk, st, wp in (
            (128, 128, 128, 3, 4),  # the H200's pick for every training shape of the 2B-4T stack
            (128, 128, 128, 4, 8),
            (128, 256, 128, 3, 8),
            (256, 128, 128, 3, 8),
            (128, 64, 128, 4, 4),
            (64, 128, 256, 3, 4),
            (128, 256, 64, 4, 8),
        )
    ]


@functools.cache
def _jitted(autotuned: bool):
    """The kernel, jitted at first use; `autotuned`: picking its tiles from _GPU_CONFIGS per shape."""
    kernel = triton.jit(_int8_matmul_kernel)
    return triton.autotune(_GPU_CONFIGS, key=["M", "N", "K"])(kernel) if autotuned else kernel


def _launch(a: torch.Tensor, b: torch.Tensor, ra: torch.Tensor, cs: torch.Tensor, out: torch.Tensor) -> None:
    m, k = a.shape
    n = b.shape[0]
    if _interpret():
        bm = bn = bk = 32
        grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
        _jitted(False)[grid](a, b, out, ra, cs, m, n, k, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=4)
    else:
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
        _jitted(True)[grid](a, b, out, ra, cs, m, n, k)


@torch.library.custom_op("pybitnet::int8_mm", mutates_args=())
def int8_mm(
    a: torch.Tensor, b: torch.Tensor, row_div: torch.Tensor, col_mul: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor:
    """(a [M, K] int8 @ b [N, K]^T int8, exact in int32) * (col_mul[n] / row_div[m]) (float32 scales [N] and
    [M]), as `out_dtype`."""
    a, b = a.contiguous(), b.contiguous()
    ra, cs = row_div.float().contiguous(), col_mul.float().contiguous()
    m, n = a.shape[0], b.shape[0]
    if m == 0 or n == 0:
        return a.new_empty((m, n), dtype=out_dtype)
    if not triton_available() or (a.device.type == "cpu" and not _interpret()):
        return (torch._int_mm(a, b.t()).float() * (cs[None, :] / ra[:, None])).to(out_dtype)
    out = torch.empty((m, n), dtype=out_dtype, device=a.device)
    _launch(a, b, ra, cs, out)
    return out


@int8_mm.register_fake
def _(a, b, row_div, col_mul, out_dtype):
    return a.new_empty((a.shape[0], b.shape[0]), dtype=out_dtype)


def int8_matmul(
    xq: torch.Tensor, wq: torch.Tensor, a: torch.Tensor, s: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """(xq [M, K] int8 @ wq [N, K]^T int8, exact in int32) * (s / a) as `dtype`: a [M] the activations'
    per-row scale, s [N] (or [1], broadcast) the weights' per-row scale; float32, as the reference rounds."""
    return torch.ops.pybitnet.int8_mm(xq, wq, a, s.expand(wq.shape[0]), dtype)

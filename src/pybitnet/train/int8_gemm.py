"""The int8 GEMM of BitLinear training: C[M, N] = (A[M, K] int8 @ B[N, K]^T int8, exact in int32) * s / a,
with a [M] a per-row and s [N] a per-column scale; and its block-scaled form, for weight gradients: C[m, n] =
sum over groups of G values of k of sa[m, group] * (A[m, group] . B[n, group]), each group's sum exact.

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
        a_ptr, b_ptr, c_ptr, ra_ptr, cs_ptr, sa_ptr, M, N, K, SA_COLS,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
        SCALE_GROUP: tl.constexpr,
    ):  # fmt: skip
        """SCALE_GROUP 0: the s / a product. Else block-scaled, BLOCK_K = SCALE_GROUP: each k-step's product
        (one group, exact in int32) times sa[m, group], summed in float32; ra, cs unused."""
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
        acc_f = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        sa_rows = sa_ptr + rm_load.to(tl.int64) * SA_COLS
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            a = tl.load(a_ptrs, mask=rk[None, :] < K - k * BLOCK_K, other=0)
            b = tl.load(b_ptrs, mask=rk[:, None] < K - k * BLOCK_K, other=0)
            if SCALE_GROUP == 0:
                acc = tl.dot(a, b, acc, out_dtype=tl.int32)
            else:  # |step| <= 128 * 128 * BLOCK_K < 2**24: exact in float32 before the scale
                step = tl.dot(a, b, out_dtype=tl.int32).to(tl.float32)
                acc_f += step * tl.load(sa_rows + k)[:, None]
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K
        if SCALE_GROUP == 0:
            # the reference's epilogue acc * (s / a): a rounded quotient per element, then a rounded product
            ra = tl.load(ra_ptr + rm, mask=rm < M, other=1.0)
            cs = tl.load(cs_ptr + rn, mask=rn < N, other=0.0)
            s2, a2 = tl.broadcast(cs[None, :], ra[:, None])
            c = acc.to(tl.float32) * tl.math.div_rn(s2, a2)
        else:
            c = acc_f
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
def _jitted(autotuned: bool, scaled: bool):
    """The kernel, jitted at first use; `autotuned`: picking its tiles from _GPU_CONFIGS per shape (for the
    block-scaled product, those whose k-step is the scale group)."""
    kernel = triton.jit(_int8_matmul_kernel)
    if not autotuned:
        return kernel
    configs = [c for c in _GPU_CONFIGS if not scaled or c.kwargs["BLOCK_K"] == SCALE_GROUP]
    return triton.autotune(configs, key=["M", "N", "K"])(kernel)


def _launch(a, b, ra, cs, out, sa=None, group: int = 0) -> None:
    """One launch: the s / a product, or (sa [M, ceil(K / group)] given) the block-scaled one."""
    m, k = a.shape
    n = b.shape[0]
    sa_cols = 0 if sa is None else sa.shape[1]
    sa = ra if sa is None else sa
    if _interpret():
        bm = bn = 32
        bk = group or 32
        grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
        tiles = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 4}
        _jitted(False, False)[grid](a, b, out, ra, cs, sa, m, n, k, sa_cols, SCALE_GROUP=group, **tiles)
    else:
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
        _jitted(True, group > 0)[grid](a, b, out, ra, cs, sa, m, n, k, sa_cols, SCALE_GROUP=group)


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


SCALE_GROUP = 128  # values of k that share a scale in the block-scaled product


@torch.library.custom_op("pybitnet::int8_mm_block_scaled", mutates_args=())
def int8_mm_block_scaled(a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor) -> torch.Tensor:
    """Float32 [M, N]: the sum over groups g of SCALE_GROUP values of k of a_scale[m, g] * (a[m, g] . b[n, g])
    for a [M, K] and b [N, K] int8, a_scale [M, ceil(K / SCALE_GROUP)] float32; each group's dot is exact."""
    a, b, sa = a.contiguous(), b.contiguous(), a_scale.float().contiguous()
    m, n = a.shape[0], b.shape[0]
    if m == 0 or n == 0:
        return a.new_empty((m, n), dtype=torch.float32)
    if not triton_available() or (a.device.type == "cpu" and not _interpret()):
        out = a.new_zeros((m, n), dtype=torch.float32)
        for g, k0 in enumerate(range(0, a.shape[1], SCALE_GROUP)):
            part = torch._int_mm(a[:, k0 : k0 + SCALE_GROUP].contiguous(), b[:, k0 : k0 + SCALE_GROUP].t())
            out += part.float() * sa[:, g, None]
        return out
    out = torch.empty((m, n), dtype=torch.float32, device=a.device)
    ones = sa.new_ones(1)
    _launch(a, b, ones, ones, out, sa, SCALE_GROUP)
    return out


@int8_mm_block_scaled.register_fake
def _(a, b, a_scale):
    return a.new_empty((a.shape[0], b.shape[0]), dtype=torch.float32)


def int8_matmul(
    xq: torch.Tensor, wq: torch.Tensor, a: torch.Tensor, s: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """(xq [M, K] int8 @ wq [N, K]^T int8, exact in int32) * (s / a) as `dtype`: a [M] the activations'
    per-row scale, s [N] (or [1], broadcast) the weights' per-row scale; float32, as the reference rounds."""
    return torch.ops.pybitnet.int8_mm(xq, wq, a, s.expand(wq.shape[0]), dtype)

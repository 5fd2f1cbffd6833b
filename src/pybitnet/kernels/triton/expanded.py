"""Products for many rows through ternary codes expanded to int8 once per call.

At thousands of rows (prefill) the tensor-core GEMM on 2-bit codes decodes every weight tile once per row tile
and stages it through shared memory, which keeps it far below the int8 peak. Here one small kernel expands the
whole weight to int8 {-1, 0, 1} in a scratch buffer (reused, sized for the largest matrix; the 2-bit weights
stay the only stored copy), then either
- "int_mm": torch._int_mm (cuBLASLt int8 tensor cores, exact int32 accumulation) and an epilogue kernel that
  applies the scales, the gated activation and the residual exactly as `_mm_kernel` does, or
- "w8": `_mm_kernel` on the int8 weight (plain int8 `tl.dot` tiles, epilogue fused).
`matmul.ternary_mm` routes here from `matmul.EXPAND_MIN_ROWS` rows on.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...quant.layouts import PackedWeight
from .common import LAUNCH_OPTS, launch_kwargs, on_gpu, scratch_buffer
from .matmul import GROUP_M, MMConfig, _epilogue, _mm_kernel, _signed_codes, rows_bucket

BACKENDS = ("int_mm", "w8")
# `_mm_kernel` tiles on int8 weights, by (rows bucket, N, K, gated) as matmul.TUNED: the fastest measured on
# an H200 for the 2B-4T projections (gate_up: 128 paired weight rows, 64 outputs, a tile)
W8_TUNED: dict[tuple[int, int, int, bool], MMConfig] = {
    (128, 3840, 2560, False): MMConfig(bm=128, bn=128, bk=128, num_warps=4),  # 48.8 µs, bf16 56.6
    (128, 2560, 2560, False): MMConfig(bm=64, bn=128, bk=128, num_stages=4),  # 44.5 µs, bf16 36.0
    (128, 6912, 2560, True): MMConfig(bm=128, bn=128, bk=128, num_warps=4),  # 168.9 µs, bf16 194.9
    (128, 2560, 6912, False): MMConfig(bm=64, bn=128, bk=128, num_stages=4),  # 94.1 µs, bf16 92.9
    # 64 rows, on codes kept as int8 (`int8_codes`, the engine's batched decode)
    (64, 3840, 2560, False): MMConfig(bm=64, bn=32, bk=256, num_stages=4),  # 7.01 µs, bf16 7.00
    (64, 2560, 2560, False): MMConfig(bm=64, bn=32, bk=256, num_stages=4),  # 6.73 µs, bf16 6.30
    (64, 6912, 2560, True): MMConfig(bm=64, bn=64, bk=128, num_stages=4),  # 13.79 µs, bf16 21.93
    (64, 2560, 6912, False): MMConfig(bm=64, bn=32, bk=256, num_stages=4),  # 12.14 µs, bf16 10.73
}
W8_DEFAULT = MMConfig(bm=128, bn=128, bk=128, num_warps=8, num_stages=4)
W8_FEW_ROWS = MMConfig(bm=64, bn=64, bk=128, num_stages=4)  # up to 64 rows: half the tile of W8_DEFAULT


@triton.jit
def _expand_kernel(
    w_ptr, o_ptr, N, K, KW, BN: tl.constexpr, BC: tl.constexpr, PAIRED: tl.constexpr, NATIVE: tl.constexpr
):  # fmt: skip
    """int8 [N, K] codes {-1, 0, 1} from "triton_i2" bytes [N, KW]: byte column c holds elements
    (c // 32) * 128 + s * 32 + c % 32 of its row for slices s = 0..3. PAIRED (gate rows then up rows): row r
    of the gate half goes to row 2r, row r of the up half to row 2r + 1."""
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    n_ok = (rn < N)[:, None]
    wt = tl.load(w_ptr + rn.to(tl.int64)[:, None] * KW + c[None, :], mask=n_ok & (c < KW)[None, :], other=0)
    c0, c1, c2, c3 = _signed_codes(wt, NATIVE)
    e = ((c // 32) * 128 + c % 32)[None, :]
    ro = rn
    if PAIRED:
        half = N // 2
        ro = tl.where(rn < half, 2 * rn, 2 * (rn - half) + 1)
    rows = o_ptr + ro.to(tl.int64)[:, None] * K
    tl.store(rows + e, c0, mask=n_ok & (e < K))
    tl.store(rows + e + 32, c1, mask=n_ok & (e + 32 < K))
    tl.store(rows + e + 64, c2, mask=n_ok & (e + 64 < K))
    tl.store(rows + e + 96, c3, mask=n_ok & (e + 96 < K))


def expand_codes(w: PackedWeight, paired: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
    """The codes of a "triton_i2" weight as int8 [N, K], into `out` or else the shared "codes" scratch buffer
    (valid until the next expansion on this device). `paired`: a gate / up weight with the gate and up row of
    each output side by side (rows 2r, 2r + 1), so one product tile holds both halves of its outputs."""
    n, k = w.shape
    buf = out
    if buf is None:
        buf = scratch_buffer(w.data.device, -(-n * k // 4), "codes").view(torch.int8)[: n * k].view(n, k)
    bn, bc = 32, 128
    grid = (triton.cdiv(n, bn), triton.cdiv(w.data.shape[1], bc))
    _expand_kernel[grid](
        w.data, buf, n, k, w.data.shape[1], BN=bn, BC=bc, PAIRED=paired, NATIVE=on_gpu(w.data), num_warps=4
    )
    return buf


def int8_codes(w: PackedWeight, gated: bool = False) -> torch.Tensor:
    """The codes of a "triton_i2" weight expanded to int8 once, to keep (four times the 2-bit bytes): products
    of many rows on them (`ternary_mm(..., codes=)`) skip the expansion and the 2-bit decoding. `gated`: a
    gate / up weight, stored with its rows paired as the "w8" product reads them."""
    return expand_codes(w, gated, torch.empty(w.shape, dtype=torch.int8, device=w.data.device))


@triton.jit
def _scale_kernel(
    acc_ptr, a_ptr, s_ptr, o_ptr, r_ptr, M, N, stride_acc, stride_o, stride_r,
    BM: tl.constexpr, BN: tl.constexpr, ACT: tl.constexpr, RESIDUAL: tl.constexpr, ROW_SCALE: tl.constexpr,
    NATIVE: tl.constexpr,
):  # fmt: skip
    """`_mm_kernel`'s epilogue on int32 products acc [M, N] (or [M, 2N], gate then up, with ACT)."""
    rm = tl.program_id(1) * BM + tl.arange(0, BM)
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    m_ok = rm < M
    n_ok = rn < N
    mask = m_ok[:, None] & n_ok[None, :]
    ptrs = acc_ptr + rm.to(tl.int64)[:, None] * stride_acc + rn[None, :]
    acc = tl.load(ptrs, mask=mask, other=0)
    acc_u = acc
    if ACT != 0:
        acc_u = tl.load(ptrs + N, mask=mask, other=0)
    a = tl.load(a_ptr + rm, mask=m_ok, other=1.0)
    _epilogue(acc, acc_u, rm, rn, m_ok, n_ok, a, s_ptr, o_ptr, r_ptr, N, stride_o, stride_r,
              ACT, RESIDUAL, ROW_SCALE, NATIVE)  # fmt: skip


def int_mm_ok(m: int, n_rows: int, k: int) -> bool:
    """torch._int_mm's shape rules on CUDA (more than 16 rows, K and N multiples of 8)."""
    return m > 16 and k % 8 == 0 and n_rows % 8 == 0


def expanded_mm(
    xq: torch.Tensor,
    a: torch.Tensor,
    w: PackedWeight,
    out: torch.Tensor,
    n: int,
    act_code: int,
    residual: torch.Tensor | None,
    backend: str,
    config: MMConfig | None = None,
    codes: torch.Tensor | None = None,
) -> torch.Tensor:
    """out = epilogue(xq @ expand(W).T) (arguments as matmul.ternary_mm has checked them). "int_mm" falls
    back to "w8" on shapes torch._int_mm rejects; `config`: the "w8" tiles (else W8_TUNED, or W8_FEW_ROWS /
    W8_DEFAULT by rows); `codes`: W's codes kept by the caller (`int8_codes`), "w8" only."""
    if backend not in BACKENDS:
        raise ValueError(f"expanded-weight backend must be one of {BACKENDS}, got {backend!r}")
    m, k = xq.shape
    int_mm = backend == "int_mm" and int_mm_ok(m, w.shape[0], k) and codes is None
    # "w8" multiplies gate and up rows paired, one accumulator a tile (two would double its registers)
    paired = act_code != 0 and not int_mm
    if codes is None:
        codes = expand_codes(w, paired)
    elif codes.shape != w.shape or codes.dtype != torch.int8:
        got = f"{codes.dtype} {tuple(codes.shape)}"
        raise ValueError(f"codes must be int8 {tuple(w.shape)} from int8_codes(w), got {got}")
    row_scale = w.scale.numel() > 1
    res = residual if residual is not None else out
    stride_r = residual.stride(0) if residual is not None else 0
    if int_mm:
        acc = torch._int_mm(xq if xq.is_contiguous() else xq.contiguous(), codes.t())
        bm, bn = 32, 128
        _scale_kernel[(triton.cdiv(n, bn), triton.cdiv(m, bm))](
            acc, a, w.scale, out, res, m, n, acc.stride(0), out.stride(0), stride_r,
            BM=bm, BN=bn, ACT=act_code, RESIDUAL=residual is not None, ROW_SCALE=row_scale,
            NATIVE=on_gpu(xq), num_warps=4, **LAUNCH_OPTS,
        )  # fmt: skip
        return out
    fallback = W8_FEW_ROWS if m <= 64 else W8_DEFAULT
    cfg = config or W8_TUNED.get((rows_bucket(m), n, k, act_code != 0), fallback)
    grid = (triton.cdiv(2 * n if paired else n, cfg.bn) * triton.cdiv(m, cfg.bm), 1)
    _mm_kernel[grid](
        xq, a, codes, w.scale, out, res, out, out,
        m, n, k, k, xq.stride(0), out.stride(0), stride_r,
        BM=cfg.bm, BN=cfg.bn, BK=cfg.bk, SPLIT_K=1, GROUP_M=GROUP_M, W8=True, PAIRED=paired, ACT=act_code,
        RESIDUAL=residual is not None, ROW_SCALE=row_scale, SWAP=False, NATIVE=on_gpu(xq),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **launch_kwargs(False),
    )  # fmt: skip
    return out

"""Ternary (W2A8) and int8 (W8A8) matrix products in Triton, integer-exact, with fused epilogues.

Two kernels (and a variant of the second):
- `_mm_kernel`: any number of rows on int8 tensor cores (`tl.dot`); the 2-bit codes of a weight tile are
  expanded to int8 {-1, 0, 1} in registers, four 32-column slices per byte column (the "triton_i2" layout).
  Also takes int8 weights (the int8 lm_head, and ternary weights expanded once per call for many rows:
  expanded.py, from EXPAND_MIN_ROWS rows on).
- `_gemv_kernel`: one row (decode at batch 1) on the integer ALUs. Each 32-bit register holds 16 codes; on the
  GPU one inline-PTX block per register expands them with shifts and masks and multiplies with `dp4a`, four
  products per instruction, against codes w+1 in {0,1,2}; the row sum of the activations is subtracted once.
  The activation row can come as float: the kernel then applies RMSNorm and int8 quantization itself (each
  program from the whole row, which sits in L2), so a norm + quantize launch disappears from the decode step.
  `_gemv_resident_kernel` (`MMConfig(resident=R)`) is the same product with at most R programs a
  multiprocessor, each over one or several output tiles and all of K (a row's code words in two power-of-two
  pieces, so few lanes idle), the next tile's weights requested before the current one is multiplied, and a
  float row normalized and quantized straight into the words its threads multiply (in registers, not
  through memory): the 2B-4T decode step's projections run on it (benchmarks/gpu_gemv_resident.py,
  gpu_decode_timeline.py; gpu_gemv_probe.py times its steps inside the decode step).

Both split K across programs where it pays: each program stores its partial int32 sums in its own plane of a
workspace, and the last program of each output tile (an arrival counter decides) adds the planes up and
applies the epilogue.

Epilogue, in the reference's float order: y = acc * (s / a) cast to the output dtype; optionally the gated
relu²(gate) * up of the 2B-4T MLP (gate and up rows stacked in one weight) and a residual add.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ...quant.layouts import PackedWeight
from ...quant.layouts.triton_i2 import padded_cols
from .common import (
    ACTIVATIONS,
    Probe,
    absmax_scale,
    dependency_wait,
    gated_activation,
    interpreting,
    launch_kwargs,
    multiprocessors,
    on_gpu,
    pdl_gate,
    pdl_launch,
    probe_stamp,
    quantize_i8,
    round_to,
    scratch_buffer,
)
from .quant import load_norm_quant, rms_apply, rms_inverse_of_sum


@triton.jit
def _scale_rows(acc, s, a):
    """acc int32 [.., BN] * (s / a), s [BN] (per output) and a [..] (per row), as reference.scale_output."""
    s2, a2 = tl.broadcast(s[None, :], a[:, None])
    return acc.to(tl.float32) * tl.math.div_rn(s2, a2)


@triton.jit
def _output_scales(s_ptr, rn, n_ok, N, ACT: tl.constexpr, ROW_SCALE: tl.constexpr):
    """(s, su): the weight scales of output columns rn (per output or per tensor), su those of the up rows."""
    s = tl.load(s_ptr + rn, mask=n_ok, other=0.0) if ROW_SCALE else tl.load(s_ptr + rn * 0)
    su = s
    if ACT != 0 and ROW_SCALE:
        su = tl.load(s_ptr + N + rn, mask=n_ok, other=0.0)
    return s, su


@triton.jit
def _scaled_output(acc, acc_u, a, s, su, ODT: tl.constexpr, ACT: tl.constexpr, NATIVE: tl.constexpr):
    """acc * (s / a) rounded to ODT (a [BM] per row, s [BN]); with ACT the gated act(gate) * up."""
    y = round_to(_scale_rows(acc, s, a), ODT, NATIVE)
    if ACT != 0:
        y = gated_activation(y, round_to(_scale_rows(acc_u, su, a), ODT, NATIVE), ACT, ODT, NATIVE)
    return y


@triton.jit
def _epilogue(
    acc, acc_u, rm, rn, m_ok, n_ok, a, s_ptr, o_ptr, r_ptr, N, stride_o, stride_r,
    ACT: tl.constexpr, RESIDUAL: tl.constexpr, ROW_SCALE: tl.constexpr, NATIVE: tl.constexpr,
):  # fmt: skip
    """Scale (a [BM] per row, s per output or per tensor), gated activation, residual; store."""
    odt = o_ptr.dtype.element_ty
    s, su = _output_scales(s_ptr, rn, n_ok, N, ACT, ROW_SCALE)
    y = _scaled_output(acc, acc_u, a, s, su, odt, ACT, NATIVE)
    mask = m_ok[:, None] & n_ok[None, :]
    if RESIDUAL:
        res = tl.load(r_ptr + rm.to(tl.int64)[:, None] * stride_r + rn[None, :], mask=mask, other=0.0)
        y = round_to(res.to(tl.float32) + y, odt, NATIVE)
    tl.store(o_ptr + rm.to(tl.int64)[:, None] * stride_o + rn[None, :], y.to(odt), mask=mask)


@triton.jit
def _finish(
    acc, acc_u, rm, rn, m_ok, n_ok, a, s_ptr, o_ptr, r_ptr, ws_ptr, cnt_ptr, tile, pid_k, M, N, stride_o,
    stride_r, SPLIT_K: tl.constexpr, ACT: tl.constexpr, RESIDUAL: tl.constexpr, ROW_SCALE: tl.constexpr,
    NATIVE: tl.constexpr,
):  # fmt: skip
    """The epilogue, after adding up the split-K partial sums of output tile `tile` when K is split: each
    program stores its partial sums in its own plane of the workspace [SPLIT_K, M, width] (plain stores, no
    atomics on the data), and the last of the tile's programs to arrive (a counter) adds the planes up."""
    if SPLIT_K == 1:
        _epilogue(acc, acc_u, rm, rn, m_ok, n_ok, a, s_ptr, o_ptr, r_ptr, N, stride_o, stride_r,
                  ACT, RESIDUAL, ROW_SCALE, NATIVE)  # fmt: skip
    else:
        width = 2 * N if ACT != 0 else N
        plane = (tl.zeros((), tl.int64) + M) * width
        mask = m_ok[:, None] & n_ok[None, :]
        ws = ws_ptr + rm.to(tl.int64)[:, None] * width + rn[None, :]
        tl.store(ws + pid_k * plane, acc, mask=mask)
        if ACT != 0:
            tl.store(ws + pid_k * plane + N, acc_u, mask=mask)
        # every thread's partial sums are stored before the arrival is counted; the counter's acquire-release
        # atomic orders them before the last program's loads, which read L2 (.cg), where the stores went
        tl.debug_barrier()
        arrived = tl.atomic_add(cnt_ptr + tile, 1)
        if arrived == SPLIT_K - 1:
            total = tl.zeros_like(acc)
            total_u = tl.zeros_like(acc_u)
            for sp in tl.static_range(SPLIT_K):
                total += tl.load(ws + sp * plane, mask=mask, other=0, cache_modifier=".cg")
                if ACT != 0:
                    total_u += tl.load(ws + sp * plane + N, mask=mask, other=0, cache_modifier=".cg")
            tl.atomic_xchg(cnt_ptr + tile, 0)
            _epilogue(total, total_u, rm, rn, m_ok, n_ok, a, s_ptr, o_ptr, r_ptr, N, stride_o, stride_r,
                      ACT, RESIDUAL, ROW_SCALE, NATIVE)  # fmt: skip


@triton.jit
def _signed_codes(wt, NATIVE: tl.constexpr):
    """The four int8 {-1, 0, 1} slices of a byte tile of codes w+1 (slice s: bits 7-2s .. 6-2s). On the GPU a
    few 32-bit operations decode four bytes at once: ((c | 0x80) - 1) ^ 0x80 maps 0, 1, 2 to -1, 0, 1 bytewise
    without borrows."""
    if NATIVE:
        c0, c1, c2, c3 = tl.inline_asm_elementwise(
            """
            {
            .reg .b32 t<4>;
            shr.u32 t0, $4, 6;
            shr.u32 t1, $4, 4;
            shr.u32 t2, $4, 2;
            and.b32 t0, t0, 0x03030303;
            and.b32 t1, t1, 0x03030303;
            and.b32 t2, t2, 0x03030303;
            and.b32 t3, $4, 0x03030303;
            or.b32 t0, t0, 0x80808080;
            or.b32 t1, t1, 0x80808080;
            or.b32 t2, t2, 0x80808080;
            or.b32 t3, t3, 0x80808080;
            sub.u32 t0, t0, 0x01010101;
            sub.u32 t1, t1, 0x01010101;
            sub.u32 t2, t2, 0x01010101;
            sub.u32 t3, t3, 0x01010101;
            xor.b32 $0, t0, 0x80808080;
            xor.b32 $1, t1, 0x80808080;
            xor.b32 $2, t2, 0x80808080;
            xor.b32 $3, t3, 0x80808080;
            }
            """,
            "=r,=r,=r,=r,r",
            [wt],
            dtype=(tl.int8, tl.int8, tl.int8, tl.int8),
            is_pure=True,
            pack=4,
        )
    else:
        c0 = ((wt >> 6) & 3).to(tl.int8) - 1
        c1 = ((wt >> 4) & 3).to(tl.int8) - 1
        c2 = ((wt >> 2) & 3).to(tl.int8) - 1
        c3 = (wt & 3).to(tl.int8) - 1
    return c0, c1, c2, c3


@triton.jit
def _dot_slices(x0, x1, x2, x3, wt, acc, SWAP: tl.constexpr, NATIVE: tl.constexpr):
    """acc += x @ W.T for one K block: x0..x3 [BM, BK/4] the activations of the four slices, wt [BN, BK/4].
    SWAP: acc is [BN, BM] and gets W @ x.T, so the decoded codes are the first operand, which Hopper's wgmma
    can read from registers (no shared-memory round trip for the weights)."""
    c0, c1, c2, c3 = _signed_codes(wt, NATIVE)
    if SWAP:
        acc = tl.dot(c0, tl.trans(x0), acc, out_dtype=tl.int32)
        acc = tl.dot(c1, tl.trans(x1), acc, out_dtype=tl.int32)
        acc = tl.dot(c2, tl.trans(x2), acc, out_dtype=tl.int32)
        acc = tl.dot(c3, tl.trans(x3), acc, out_dtype=tl.int32)
    else:
        acc = tl.dot(x0, tl.trans(c0), acc, out_dtype=tl.int32)
        acc = tl.dot(x1, tl.trans(c1), acc, out_dtype=tl.int32)
        acc = tl.dot(x2, tl.trans(c2), acc, out_dtype=tl.int32)
        acc = tl.dot(x3, tl.trans(c3), acc, out_dtype=tl.int32)
    return acc


@triton.jit
def _grouped_tile(pid, tiles, m_tiles, GROUP_M: tl.constexpr):
    """(row tile, column tile) of program `pid` of `tiles`: bands of GROUP_M row tiles walk the column tiles
    together, so a weight tile is read from HBM once per band and the band's activations stay in L2 (in
    row-major order every row tile would stream the whole weight again)."""
    n_tiles = tiles // m_tiles
    band = GROUP_M * n_tiles
    first_m = (pid // band) * GROUP_M
    size_m = tl.minimum(m_tiles - first_m, GROUP_M)
    return first_m + (pid % band) % size_m, (pid % band) // size_m


@triton.jit
def _mm_kernel(
    x_ptr, a_ptr, w_ptr, s_ptr, o_ptr, r_ptr, ws_ptr, cnt_ptr,
    M, N, K, KW, stride_x, stride_o, stride_r,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT_K: tl.constexpr, GROUP_M: tl.constexpr,
    W8: tl.constexpr, PAIRED: tl.constexpr, ACT: tl.constexpr, RESIDUAL: tl.constexpr,
    ROW_SCALE: tl.constexpr, SWAP: tl.constexpr, NATIVE: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """out[M, N] = epilogue(xq[M, K] @ W[N, K].T): int8 activations, W ternary ("triton_i2", KW bytes a row)
    or int8 (W8, KW = row stride). ACT (1 relu², 2 silu): W holds 2N rows, gate then up; out = act(gate) * up.
    SWAP (ternary W): accumulate the transposed product (see `_dot_slices`). PAIRED (W8 with ACT, SPLIT_K 1):
    W's 2N rows alternate gate and up (`expanded.expand_codes`), a BN-row tile gives BN / 2 outputs from one
    accumulator. Grid: (output tiles, SPLIT_K), tiles in grouped order (`_grouped_tile`).
    """
    pdl_gate(PDL)
    NW: tl.constexpr = 2 if PAIRED else 1  # weight rows per output column
    pid_m, pid_n = _grouped_tile(tl.program_id(0), tl.num_programs(0), tl.cdiv(M, BM), GROUP_M)
    rm = pid_m * BM + tl.arange(0, BM)
    rw = pid_n * BN + tl.arange(0, BN)  # weight rows of the tile
    rn = pid_n * (BN // NW) + tl.arange(0, BN // NW)  # its output columns
    m_ok = rm < M
    n_ok = rn < N
    # rows and columns past the edge read real rows again (their results are never stored), so the tile
    # loads carry no row mask and stay wide
    x_rows = x_ptr + (rm % M).to(tl.int64)[:, None] * stride_x
    w_rows = w_ptr + (rw % (N * NW)).to(tl.int64)[:, None] * KW
    u_rows = w_rows + N * KW
    if SWAP:
        acc = tl.zeros((BN, BM), tl.int32)
        acc_u = tl.zeros((BN, BM), tl.int32)
    else:
        acc = tl.zeros((BM, BN), tl.int32)
        acc_u = tl.zeros((BM, BN // NW), tl.int32)
    for kb in range(tl.program_id(1), tl.cdiv(K, BK), SPLIT_K):
        if W8:
            ks = kb * BK + tl.arange(0, BK)
            k_ok = (ks < K)[None, :]
            xt = tl.load(x_rows + ks[None, :], mask=k_ok, other=0)
            wt = tl.load(w_rows + ks[None, :], mask=k_ok, other=0)
            acc = tl.dot(xt, tl.trans(wt), acc, out_dtype=tl.int32)
            if ACT != 0 and not PAIRED:
                wu = tl.load(u_rows + ks[None, :], mask=k_ok, other=0)
                acc_u = tl.dot(xt, tl.trans(wu), acc_u, out_dtype=tl.int32)
        else:
            j = tl.arange(0, BK // 4)
            cols = kb * (BK // 4) + j
            w_mask = (cols < KW)[None, :]
            wt = tl.load(w_rows + cols[None, :], mask=w_mask, other=0)
            wu = wt
            if ACT != 0:
                wu = tl.load(u_rows + cols[None, :], mask=w_mask, other=0)
            kbase = (kb * BK + (j // 32) * 128 + (j % 32))[None, :]
            x0 = tl.load(x_rows + kbase, mask=kbase < K, other=0)
            x1 = tl.load(x_rows + kbase + 32, mask=kbase + 32 < K, other=0)
            x2 = tl.load(x_rows + kbase + 64, mask=kbase + 64 < K, other=0)
            x3 = tl.load(x_rows + kbase + 96, mask=kbase + 96 < K, other=0)
            acc = _dot_slices(x0, x1, x2, x3, wt, acc, SWAP, NATIVE)
            if ACT != 0:
                acc_u = _dot_slices(x0, x1, x2, x3, wu, acc_u, SWAP, NATIVE)
    if SWAP:
        acc = tl.trans(acc)
        acc_u = tl.trans(acc_u)
    if PAIRED:  # columns 2j, 2j + 1: gate and up of output j
        acc, acc_u = tl.split(tl.reshape(acc, (BM, BN // 2, 2)))
    a = tl.load(a_ptr + rm, mask=m_ok, other=1.0)
    tile = tl.program_id(0)
    _finish(acc, acc_u, rm, rn, m_ok, n_ok, a, s_ptr, o_ptr, r_ptr, ws_ptr, cnt_ptr, tile, tl.program_id(1),
            M, N, stride_o, stride_r, SPLIT_K, ACT, RESIDUAL, ROW_SCALE, NATIVE)  # fmt: skip


# The GEMV's inner product in PTX: the four 2-bit code planes of a 32-bit word $1 (byte b: the codes of
# elements 4j+b, +32, +64, +96 at bits 7-6 .. 1-0, as w + 1 in {0, 1, 2}) shifted and masked into four words
# of bytes, each multiplied with its slice's activation word ($2..$5) by a chained dp4a: $0 = $6 + sum.
_DOT_WORDS_PTX = tl.constexpr(
    "{\n.reg .b32 t<5>;\n"
    + "".join(f"shr.u32 t{i}, $1, {6 - 2 * i};\nand.b32 t{i}, t{i}, 0x03030303;\n" for i in range(3))
    + "and.b32 t3, $1, 0x03030303;\n"
    + "".join(
        f"dp4a.u32.s32 {out}, t{i}, ${2 + i}, {acc};\n"
        for i, (acc, out) in enumerate([("$6", "t4"), ("t4", "t4"), ("t4", "t4"), ("t4", "$0")])
    )
    + "}"
)


@triton.jit
def _dot_words(wt, x0, x1, x2, x3, acc, USE_ASM: tl.constexpr):
    """acc [BN, BK/16] += codes(w+1) . x, on 32-bit words: wt holds four bytes of codes (byte b: the codes
    of elements 4j+b, +32, +64, +96), x0..x3 [BK/16] the four activation bytes of each slice as one word.
    Nothing is unpacked into bytes and packed again: one shift, one mask and one dp4a per slice and word."""
    if USE_ASM:
        acc = tl.inline_asm_elementwise(
            _DOT_WORDS_PTX, "=r,r,r,r,r,r,r", [wt, x0[None, :], x1[None, :], x2[None, :], x3[None, :], acc],
            dtype=tl.int32, is_pure=True, pack=1,
        )  # fmt: skip
    else:
        for b in tl.static_range(4):  # byte b of each word: arithmetic shifts sign-extend the activations
            acc += ((wt >> (8 * b + 6)) & 3) * ((x0[None, :] << (24 - 8 * b)) >> 24)
            acc += ((wt >> (8 * b + 4)) & 3) * ((x1[None, :] << (24 - 8 * b)) >> 24)
            acc += ((wt >> (8 * b + 2)) & 3) * ((x2[None, :] << (24 - 8 * b)) >> 24)
            acc += ((wt >> (8 * b)) & 3) * ((x3[None, :] << (24 - 8 * b)) >> 24)
    return acc


@triton.jit
def _activation_row(x_ptr, g_ptr, a_ptr, q_ptr, offs, K, KXW, eps, X_FLOAT: tl.constexpr, NORM: tl.constexpr,
                    L2_IN: tl.constexpr, NATIVE: tl.constexpr):  # fmt: skip
    """(int8 values at offs, scale a) of a one-row GEMV's activation row: x already int8 (scale at a_ptr), or
    (X_FLOAT) the float row normalized (NORM) and quantized here, stored into the row at q_ptr (zeros to the
    end of the last 16-byte vector) for the program's threads to read back as words."""
    k_ok = offs < K
    if X_FLOAT:
        q, a = load_norm_quant(x_ptr, g_ptr, offs, k_ok, K, eps, NORM, L2_IN, NATIVE)
        q = tl.where(k_ok, q, 0)
        tl.store(q_ptr + offs, q, mask=offs < 4 * KXW)
        tl.debug_barrier()  # the row is in memory before any thread of the program reads a slice of it
    else:
        a = tl.load(a_ptr)
        q = tl.load(x_ptr + offs, mask=k_ok, other=0)
    return q, a


@triton.jit
def _slice_words(q_words, c, KXW):
    """The activation words that code words c (indices in the row) multiply: code word c holds elements
    4c'..4c'+3 of the four 32-element slices of its 128-element block (c' = c mod 8), which are activation
    words c' + 8s of the block (zero past the row's KXW words)."""
    kw = (c // 8) * 32 + (c % 8)
    x0 = tl.load(q_words + kw, mask=kw < KXW, other=0)
    x1 = tl.load(q_words + kw + 8, mask=kw + 8 < KXW, other=0)
    x2 = tl.load(q_words + kw + 16, mask=kw + 16 < KXW, other=0)
    x3 = tl.load(q_words + kw + 24, mask=kw + 24 < KXW, other=0)
    return x0, x1, x2, x3


@triton.jit
def _gemv_kernel(
    x_ptr, g_ptr, a_ptr, q_ptr, w_ptr, s_ptr, o_ptr, r_ptr, ws_ptr, cnt_ptr, g2_ptr, q2_ptr, a2_ptr, tcnt_ptr,
    N, K, KW, KXW, eps,
    BN: tl.constexpr, BK: tl.constexpr, KB: tl.constexpr, SPLIT_K: tl.constexpr, X_FLOAT: tl.constexpr,
    NORM: tl.constexpr, ACT: tl.constexpr, RESIDUAL: tl.constexpr, ROW_SCALE: tl.constexpr,
    PRIVATE_ROW: tl.constexpr, THEN_QUANT: tl.constexpr, NORM2: tl.constexpr, NB: tl.constexpr,
    USE_ASM: tl.constexpr, NATIVE: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """out[N] = epilogue(x[K] @ W[N, K].T) for ternary W ("triton_i2"); KB >= K is a power of two.

    Weights and activations are read and multiplied as 32-bit words (`_dot_words`): the int8 row at q_ptr is
    16-byte aligned and zero from K to the next multiple of 16: KXW words (a host argument, so that the
    launch's specialization knows it a multiple of 16 on real shapes and the loads stay 128-bit wide).

    x is int8 (q_ptr = x_ptr) with its scale at a_ptr, or (X_FLOAT) a float row, RMS-normalized with gain g
    (NORM) and quantized here, once per program, into the int8 row at q_ptr: every program writes the same
    bytes there, then reads its slices back like pre-quantized ones; with PRIVATE_ROW each program has its
    own row (KB bytes each), so the programs' identical stores do not queue on the same L2 lines.

    THEN_QUANT: the output row [N] (NB >= N, a power of two) is also RMS-normalized with gain g2 (NORM2) and
    quantized into q2 / a2 by the last program to arrive (counter at tcnt), so the next GEMV reads int8 and
    no program of it normalizes the whole row again."""
    _gemv_program(
        tl.program_id(0), tl.program_id(1), tl.num_programs(0), x_ptr, g_ptr, a_ptr, q_ptr, w_ptr, s_ptr,
        o_ptr, r_ptr, ws_ptr, cnt_ptr, g2_ptr, q2_ptr, a2_ptr, tcnt_ptr, N, K, KW, KXW, eps, BN, BK, KB,
        SPLIT_K, X_FLOAT, NORM, ACT, RESIDUAL, ROW_SCALE, PRIVATE_ROW, THEN_QUANT, NORM2, NB, USE_ASM, NATIVE,
        PDL, False, False, o_ptr, 0,
    )  # fmt: skip


@triton.jit
def _gemv_program(
    pid_n, pid_k, n_tiles,
    x_ptr, g_ptr, a_ptr, q_ptr, w_ptr, s_ptr, o_ptr, r_ptr, ws_ptr, cnt_ptr, g2_ptr, q2_ptr, a2_ptr, tcnt_ptr,
    N, K, KW, KXW, eps,
    BN: tl.constexpr, BK: tl.constexpr, KB: tl.constexpr, SPLIT_K: tl.constexpr, X_FLOAT: tl.constexpr,
    NORM: tl.constexpr, ACT: tl.constexpr, RESIDUAL: tl.constexpr, ROW_SCALE: tl.constexpr,
    PRIVATE_ROW: tl.constexpr, THEN_QUANT: tl.constexpr, NORM2: tl.constexpr, NB: tl.constexpr,
    USE_ASM: tl.constexpr, NATIVE: tl.constexpr, PDL: tl.constexpr, L2_IN: tl.constexpr, BAR: tl.constexpr,
    bar_ptr, bar_target,
):  # fmt: skip
    """Output tile pid_n, K share pid_k of `_gemv_kernel` (n_tiles output tiles in all), as a function so that
    a persistent kernel can run tiles in a loop (decode_layer.py). L2_IN: the float row x was just written by
    other programs of the same launch, so it is read past the L1 cache. BAR: the inputs are ready at a grid
    barrier (bar_ptr reaching bar_target), which this program passes after requesting its first weights."""
    if PRIVATE_ROW:
        q_ptr += (pid_n * SPLIT_K + pid_k).to(tl.int64) * KB
    rn = pid_n * BN + tl.arange(0, BN)
    n_ok = rn < N
    BC: tl.constexpr = BK // 16  # tile columns (code words) per K block
    j = tl.arange(0, BC)
    # row addresses in bytes, then as words: the rows' 16-byte alignment stays known, loads stay wide
    w_rows = (w_ptr + rn.to(tl.int64)[:, None] * KW).to(tl.pointer_type(tl.int32))
    u_rows = (w_ptr + (rn + N).to(tl.int64)[:, None] * KW).to(tl.pointer_type(tl.int32))
    q_words = q_ptr.to(tl.pointer_type(tl.int32))
    # the first weight tile is requested before the activation row is ready (with PDL: while the previous
    # kernel still runs), so its latency overlaps the prologue; in the loop each iteration requests the next
    # tile before it computes on the current one
    cols = pid_k * BC + j
    w_mask = n_ok[:, None] & (cols < KW // 4)[None, :]
    wt = tl.load(w_rows + cols[None, :], mask=w_mask, other=0)
    wu = wt
    if ACT != 0:
        wu = tl.load(u_rows + cols[None, :], mask=w_mask, other=0)
    dependency_wait(PDL, BAR, bar_ptr, bar_target)

    offs = tl.arange(0, KB)
    q, a = _activation_row(x_ptr, g_ptr, a_ptr, q_ptr, offs, K, KXW, eps, X_FLOAT, NORM, L2_IN, NATIVE)
    # codes are w + 1: sum(x) over this program's K blocks is subtracted at the end
    mine = ((offs // BK) % SPLIT_K) == pid_k
    total_x = tl.sum(tl.where(mine, q.to(tl.int32), 0), axis=0)

    acc = tl.zeros((BN, BC), tl.int32)
    acc_u = tl.zeros((BN, BC), tl.int32)
    for kb in range(pid_k, tl.cdiv(K, BK), SPLIT_K):
        next_cols = (kb + SPLIT_K) * BC + j
        next_mask = n_ok[:, None] & (next_cols < KW // 4)[None, :]
        wt_next = tl.load(w_rows + next_cols[None, :], mask=next_mask, other=0)
        wu_next = wt_next
        if ACT != 0:
            wu_next = tl.load(u_rows + next_cols[None, :], mask=next_mask, other=0)
        x0, x1, x2, x3 = _slice_words(q_words, kb * BC + j, KXW)
        acc = _dot_words(wt, x0, x1, x2, x3, acc, USE_ASM)
        if ACT != 0:
            acc_u = _dot_words(wu, x0, x1, x2, x3, acc_u, USE_ASM)
        wt = wt_next
        wu = wu_next
    out = (tl.sum(acc, axis=1) - total_x)[None, :]
    out_u = (tl.sum(acc_u, axis=1) - total_x)[None, :]
    rm = tl.arange(0, 1)
    a_row = tl.zeros((1,), tl.float32) + a
    _finish(out, out_u, rm, rn, rm < 1, n_ok, a_row, s_ptr, o_ptr, r_ptr, ws_ptr, cnt_ptr,
            pid_n, pid_k, 1, N, 0, 0, SPLIT_K, ACT, RESIDUAL, ROW_SCALE, NATIVE)  # fmt: skip
    if THEN_QUANT:  # the last program to finish normalizes and quantizes the whole output row for the next op
        tl.debug_barrier()  # every thread's outputs are stored before the arrival is counted
        arrived = tl.atomic_add(tcnt_ptr, 1)
        if arrived == n_tiles - 1:
            tl.atomic_xchg(tcnt_ptr, 0)
            offs_n = tl.arange(0, NB)
            q2, a2 = load_norm_quant(o_ptr, g2_ptr, offs_n, offs_n < N, N, eps, NORM2, True, NATIVE)
            tl.store(q2_ptr + offs_n, q2, mask=offs_n < N)
            tl.store(a2_ptr, a2)


@triton.jit
def _weight_tile(w_ptr, t, N, KW, BN: tl.constexpr, c, ACT: tl.constexpr):
    """Code words c [len(c)] of the BN rows of output tile t (and of its up rows, N further, when ACT);
    zeros past N and past the row."""
    rn = t * BN + tl.arange(0, BN)
    ok = (rn < N)[:, None] & (c < KW // 4)[None, :]
    wt = tl.load((w_ptr + rn.to(tl.int64)[:, None] * KW).to(tl.pointer_type(tl.int32)) + c[None, :], mask=ok,
                 other=0)  # fmt: skip
    wu = wt
    if ACT != 0:
        u_rows = (w_ptr + (rn + N).to(tl.int64)[:, None] * KW).to(tl.pointer_type(tl.int32))
        wu = tl.load(u_rows + c[None, :], mask=ok, other=0)
    return wt, wu


@triton.jit
def _tile_dot(wt, x0, x1, x2, x3, USE_ASM: tl.constexpr):
    """[BN] sums of codes(wt) . x over a tile's code words, x0..x3 their four slices' activation words."""
    return tl.sum(_dot_words(wt, x0, x1, x2, x3, tl.zeros(wt.shape, tl.int32), USE_ASM), axis=1)


@triton.jit
def _word_elements(c0, BC: tl.constexpr):
    """Row indices [16 BC] of the activation bytes that code words c0 .. c0 + BC - 1 multiply, in the order of
    the words: slice s, byte b of code word c (position 16 (c - c0) + 4 s + b) is element 128 (c // 8) +
    32 s + 4 (c % 8) + b (the words `_slice_words` reads)."""
    i = tl.arange(0, 16 * BC)
    c = c0 + i // 16
    return (c // 8) * 128 + ((i // 4) % 4) * 32 + (c % 8) * 4 + i % 4


@triton.jit
def _quantized_words(y, a, BC: tl.constexpr, NATIVE: tl.constexpr):
    """(x0, x1, x2, x3, sum of the int8 values): the activation words [BC] of slices 0-3 from the normalized
    elements y [16 BC] in the order of `_word_elements`, quantized with scale a and packed four bytes a word
    in registers."""
    q = quantize_i8(y, a, NATIVE).to(tl.int32)
    shifted = (q & 0xFF) << (8 * (tl.arange(0, 16 * BC) % 4))
    words = tl.sum(tl.reshape(shifted, (BC, 4, 4)), axis=2)  # disjoint bytes: the sum is a bitwise or
    even, odd = tl.split(tl.reshape(words, (BC, 2, 2)))  # slices 0, 2 and 1, 3
    x0, x2 = tl.split(even)
    x1, x3 = tl.split(odd)
    return x0, x1, x2, x3, tl.sum(q, axis=0)


# Where a resident GEMV program's time goes (benchmarks/gpu_gemv_probe.py): the cycle counter at each step,
# the global timer at three (see `Probe`)
PROBE = Probe(
    ("start", "waited", "sum of squares", "absmax", "quantized", "products", "stored",
     "global start", "global waited", "global stored")
)  # fmt: skip
_PROBE_STRIDE = tl.constexpr(len(PROBE.points))


@triton.jit
def _gemv_resident_kernel(
    x_ptr, g_ptr, a_ptr, q_ptr, w_ptr, s_ptr, o_ptr, r_ptr, probe_ptr, N, K, KW, KXW, eps,
    BN: tl.constexpr, KB: tl.constexpr, BC1: tl.constexpr, BC2: tl.constexpr, X_FLOAT: tl.constexpr,
    NORM: tl.constexpr, ACT: tl.constexpr, RESIDUAL: tl.constexpr, EARLY_RESIDUAL: tl.constexpr,
    ROW_SCALE: tl.constexpr, USE_ASM: tl.constexpr, NATIVE: tl.constexpr, PDL: tl.constexpr,
    ONE_TILE: tl.constexpr, PROBE: tl.constexpr,
):  # fmt: skip
    """`_gemv_kernel` with programs that stay resident: program p computes output tiles p, p + P, ... each
    over all of K at once, and requests the next tile's weights before it multiplies the current one, so its
    loads stay in flight from its first tile to its last. A row's code words are read as two power-of-two
    pieces (BC1, then BC2 from BC1 on), so few lanes idle when the row is not a power of two long (2560
    inputs: 128 + 32 words, not 256); the activation words of both pieces stay in registers for all tiles.

    A float row is normalized and quantized by each program, loaded in the order of the words its threads
    multiply and packed into them in registers: nothing goes through memory between the quantization and
    the products (the sum of squares is thus added in another order than `norm_quant`'s). Before the wait
    for the previous kernel (PDL) a program requests what no kernel of the step writes: its first tile's
    weights and scales and the norm's gain; with EARLY_RESIDUAL also its first residual tile, which the
    caller guarantees was written at least two launches before (complete when this kernel starts, see
    `ternary_gemv`). ONE_TILE: as many programs as tiles, so nothing is requested for a next tile (whose
    registers would keep two programs from sharing a multiprocessor). PROBE: timestamps of each program's
    steps into probe_ptr (see `PROBE`)."""
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    stamps = probe_ptr + pid * _PROBE_STRIDE
    probe_stamp(stamps, 0, pid, PROBE, 7)
    c1 = tl.arange(0, BC1)
    c2 = BC1 + tl.arange(0, BC2)
    wt1, wu1 = _weight_tile(w_ptr, pid, N, KW, BN, c1, ACT)
    wt2, wu2 = _weight_tile(w_ptr, pid, N, KW, BN, c2, ACT)
    rn = pid * BN + tl.arange(0, BN)
    s, su = _output_scales(s_ptr, rn, rn < N, N, ACT, ROW_SCALE)
    e1 = _word_elements(0, BC1)
    e2 = _word_elements(BC1, BC2)
    g1, g2 = e1, e2  # placeholders without a norm
    if X_FLOAT and NORM:
        g1 = tl.load(g_ptr + e1, mask=e1 < K, other=0.0).to(tl.float32)
        g2 = tl.load(g_ptr + e2, mask=e2 < K, other=0.0).to(tl.float32)
    res = tl.zeros((BN,), tl.float32)
    if RESIDUAL and EARLY_RESIDUAL:  # past L1: written by an earlier kernel while this one may have started
        res = tl.load(r_ptr + rn, mask=rn < N, other=0.0, cache_modifier=".cg").to(tl.float32)
    pdl_gate(PDL)
    probe_stamp(stamps, 1, pid, PROBE, 8)
    if RESIDUAL and not EARLY_RESIDUAL:
        res = tl.load(r_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
    if X_FLOAT:  # RMSNorm and quantization as `load_norm_quant`, on the elements in the words' order
        raw1 = tl.load(x_ptr + e1, mask=e1 < K, other=0.0)
        raw2 = tl.load(x_ptr + e2, mask=e2 < K, other=0.0)
        y1 = raw1.to(tl.float32)
        y2 = raw2.to(tl.float32)
        if NORM:
            r = rms_inverse_of_sum(tl.sum(y1 * y1, axis=0) + tl.sum(y2 * y2, axis=0), K, eps)
            probe_stamp(stamps, 2, r.to(tl.int32, bitcast=True), PROBE)
            y1 = rms_apply(y1, r, g1, raw1.dtype, NATIVE)
            y2 = rms_apply(y2, r, g2, raw2.dtype, NATIVE)
        a = absmax_scale(tl.maximum(tl.max(tl.abs(y1), axis=0), tl.max(tl.abs(y2), axis=0)))
        probe_stamp(stamps, 3, a.to(tl.int32, bitcast=True), PROBE)
        x10, x11, x12, x13, total1 = _quantized_words(y1, a, BC1, NATIVE)
        x20, x21, x22, x23, total2 = _quantized_words(y2, a, BC2, NATIVE)
        total_x = total1 + total2
    else:
        a = tl.load(a_ptr)
        offs = tl.arange(0, KB)
        total_x = tl.sum(tl.load(x_ptr + offs, mask=offs < K, other=0).to(tl.int32), axis=0)
        q_words = q_ptr.to(tl.pointer_type(tl.int32))
        x10, x11, x12, x13 = _slice_words(q_words, c1, KXW)
        x20, x21, x22, x23 = _slice_words(q_words, c2, KXW)
    probe_stamp(stamps, 4, total_x, PROBE)
    odt = o_ptr.dtype.element_ty
    a_row = tl.zeros((1,), tl.float32) + a
    for t in range(pid, tl.cdiv(N, BN), n_prog):
        rn = t * BN + tl.arange(0, BN)
        wt1_next, wu1_next, wt2_next, wu2_next, s_next, su_next, res_next = wt1, wu1, wt2, wu2, s, su, res
        if not ONE_TILE:  # the next tile's weights, scales and residual, in flight during this one
            rn_next = rn + n_prog * BN
            wt1_next, wu1_next = _weight_tile(w_ptr, t + n_prog, N, KW, BN, c1, ACT)
            wt2_next, wu2_next = _weight_tile(w_ptr, t + n_prog, N, KW, BN, c2, ACT)
            s_next, su_next = _output_scales(s_ptr, rn_next, rn_next < N, N, ACT, ROW_SCALE)
            if RESIDUAL:
                res_next = tl.load(r_ptr + rn_next, mask=rn_next < N, other=0.0).to(tl.float32)
        out = _tile_dot(wt1, x10, x11, x12, x13, USE_ASM) + _tile_dot(wt2, x20, x21, x22, x23, USE_ASM)
        out -= total_x
        out_u = out
        if ACT != 0:
            out_u = _tile_dot(wu1, x10, x11, x12, x13, USE_ASM) + _tile_dot(wu2, x20, x21, x22, x23, USE_ASM)
            out_u -= total_x
        if PROBE:  # (the last tile's times remain)
            probe_stamp(stamps, 5, tl.max(out + out_u, axis=0), PROBE)
        y = _scaled_output(out[None, :], out_u[None, :], a_row, s, su, odt, ACT, NATIVE)
        if RESIDUAL:
            y = round_to(res[None, :] + y, odt, NATIVE)
        tl.store(o_ptr + rn[None, :], y.to(odt), mask=(rn < N)[None, :])
        probe_stamp(stamps, 6, t, PROBE, 9)
        wt1, wu1, wt2, wu2 = wt1_next, wu1_next, wt2_next, wu2_next
        s, su, res = s_next, su_next, res_next


def _gemv_rows(x: torch.Tensor, x_float: bool, kb: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, the int8 row buffer a one-row GEMV reads words from): for a float x, `rows` rows of kb bytes it
    quantizes into; for an int8 x, x itself, or an aligned zero-padded copy when x is not in whole 16-byte
    vectors (the kernels read 16 bytes at a time)."""
    k = x.shape[1]
    if x_float:
        return x, scratch_buffer(x.device, rows * kb // 4, "row").view(torch.int8)
    if k % 16 or x.data_ptr() % 16:
        q = scratch_buffer(x.device, kb // 4, "row").view(torch.int8)
        q[k:].zero_()
        q[:k].copy_(x[0])
        return q[None, :k], q
    return x, x


def resident_shape(n: int, k: int, cfg: MMConfig, sms: int) -> tuple[int, dict]:
    """(programs, the row's compile-time arguments) of `_gemv_resident_kernel` for n outputs over k inputs
    with `sms` multiprocessors: a row's code words as two pieces, the largest power of two and then the rest
    (rounded up to one); ONE_TILE when each program has one tile."""
    tiles = triton.cdiv(n, cfg.bn)
    programs = min(tiles, cfg.resident * sms)
    words = padded_cols(k) // 16  # 32-bit words of 2-bit codes
    bc1 = 1 << (words.bit_length() - 1)
    consts = dict(BN=cfg.bn, KB=gemv_row(k)[0], BC1=bc1, BC2=triton.next_power_of_2(max(words - bc1, 1)),
                  ONE_TILE=programs == tiles)  # fmt: skip
    return programs, consts


def _gemv_resident(x, w, a, gain, eps, residual, early, act_code, out, cfg, use_asm) -> torch.Tensor:
    """ternary_gemv through `_gemv_resident_kernel`: cfg.resident programs a multiprocessor (at most one a
    tile), one K block over all of K."""
    n, k = out.shape[1], w.shape[1]
    # in the interpreter, two "multiprocessors": a few programs, each over several tiles
    sms = multiprocessors(x.device.index or 0) if on_gpu(x) else 2
    programs, shape = resident_shape(n, k, cfg, sms)
    # a float row is quantized in registers; an int8 one is read as words from an aligned copy if need be
    x, q = (x, x) if a is None else _gemv_rows(x, False, shape["KB"], 1)
    probe = PROBE.row(x)
    _gemv_resident_kernel[(programs,)](
        x, gain if gain is not None else x, a if a is not None else x, q, w.data, w.scale, out,
        residual if residual is not None else out, probe if probe is not None else out, n, k,
        w.data.shape[1], gemv_row(k)[1], eps,
        X_FLOAT=a is None, NORM=gain is not None, ACT=act_code, RESIDUAL=residual is not None,
        EARLY_RESIDUAL=early, ROW_SCALE=w.scale.numel() > 1, NATIVE=on_gpu(x), PROBE=probe is not None,
        USE_ASM=on_gpu(x) if use_asm is None else use_asm, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages, **shape, **launch_kwargs(pdl_launch(x)),
    )  # fmt: skip
    return out


@dataclass(frozen=True)
class MMConfig:
    """Tile shape and launch options of one product; `gemv` picks the one-row ALU kernel."""

    bm: int = 64
    bn: int = 64
    bk: int = 256
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    gemv: bool = False
    swap: bool = False
    private_row: bool = False  # fused-norm GEMV: each program quantizes into its own row, not a shared one
    resident: int = 0  # one-row GEMV: this many resident programs a multiprocessor, each over many tiles


# (rows bucket, N, K, gated) -> the tiles measured fastest on an H200 (benchmarks/gpu_bench.py, 2026-11-30)
# for the 2B-4T projections as the engine runs them; other shapes fall back to `default_config`'s rules. The
# one-row tiles are checked in the whole decode step too (benchmarks/gpu_decode_timeline.py), where the
# fastest shape alone is not always the fastest between its neighbours.
_GEMV = functools.partial(MMConfig, num_warps=8, num_stages=1, gemv=True)
_H200_2B4T = {
    # the decode step's one-row projections (fused norm): resident programs, one tile each. The step at
    # context 384 (benchmarks/gpu_decode_timeline.py): 870-878 µs on tile-a-program shapes, 835-840 with the
    # resident kernel, 772 once it quantized the row in registers, then 750 with these (the previous tiles:
    # q/k/v 64 rows x 16 warps, gate/up 64 rows one program a multiprocessor, down 16 warps), 698 once no
    # program held registers for a next tile (ONE_TILE); the tiles checked again then, none faster
    (1, 3840, 2560, False): _GEMV(bn=32, resident=1),
    (1, 2560, 2560, False): _GEMV(bn=32, resident=1),
    (1, 6912, 2560, True): _GEMV(bn=32, resident=2),  # 216 tiles: two programs on some multiprocessors
    (1, 2560, 6912, False): _GEMV(bn=32, resident=1),
    (1, 128256, 2560, False): MMConfig(bm=16, bn=256, bk=128, num_warps=8, num_stages=4),
    (64, 3840, 2560, False): MMConfig(bn=32, num_stages=4, swap=True),
    (64, 2560, 2560, False): MMConfig(bn=32, num_stages=4, swap=True),
    (64, 6912, 2560, True): MMConfig(swap=True),
    (64, 2560, 6912, False): MMConfig(bn=64, split_k=3, swap=True),  # 13.3 µs vs 21.3 unsplit
    (64, 128256, 2560, False): MMConfig(bm=64, bn=64, bk=256, num_warps=4, num_stages=3),
    (128, 3840, 2560, False): MMConfig(bm=128, bn=256, bk=128, num_warps=8),
    (128, 2560, 2560, False): MMConfig(bm=128, bn=128, num_warps=8, swap=True),
    (128, 6912, 2560, True): MMConfig(bm=128, bn=128, num_warps=8, swap=True),
    (128, 2560, 6912, False): MMConfig(bm=128, bn=128, num_warps=8, swap=True),
}
TUNED: dict[tuple[int, int, int, bool], MMConfig] = dict(_H200_2B4T)

# From this many rows on, `ternary_mm` expands the 2-bit codes to int8 and multiplies through EXPAND_BACKEND
# (see expanded.py: "int_mm" = cuBLASLt int8 + epilogue kernel, "w8" = `_mm_kernel` on int8 weights); below
# it, or with None, `_mm_kernel` decodes the 2-bit codes in registers. benchmarks/gpu_bench.py measures the
# three at 64 and 2048 rows and reports the threshold to set here: on an H200 the four projections of a
# 2B-4T layer take 411 µs through "w8" at 2048 rows against 486 µs for the 2-bit kernel (bf16 cuBLAS 357);
# at 64 rows the 2-bit kernel wins (57 against 68 µs).
EXPAND_MIN_ROWS: int | None = 256
EXPAND_BACKEND = "w8"
MM_BACKENDS = ("i2", "int_mm", "w8")


# row tiles per band of the grouped tile order (see `_grouped_tile`)
GROUP_M = 8


def rows_bucket(m: int) -> int:
    return 1 if m == 1 else 16 if m <= 16 else 64 if m <= 64 else 128


def default_config(m: int, n: int, k: int, w8: bool = False, gated: bool = False) -> MMConfig:
    """Tiles by problem size: one row runs on the ALU kernel with small N tiles and many programs (split K
    when the N tiles alone cannot fill the GPU); many rows use tensor-core tiles. The interpreter pays per
    program, so it gets few large tiles."""
    if interpreting():
        return MMConfig(bm=16 if m <= 16 else 64, bn=128, bk=256, gemv=m == 1 and not w8)
    tuned = TUNED.get((rows_bucket(m), n, k, gated))
    if tuned is not None and not (tuned.gemv and (m != 1 or w8)):
        return tuned
    if m == 1 and not w8:  # many small programs of 32-bit word tiles; split K did not pay on the 2B-4T shapes
        return _GEMV(bn=16, bk=2048)
    if m <= 16:
        return MMConfig(bm=16, bn=64 if w8 else 32, bk=256 if w8 else 512, num_warps=4, num_stages=3)
    if m <= 64:
        return MMConfig(bm=64, bn=32, bk=512, num_warps=4, num_stages=3)
    return MMConfig(bm=128, bn=128, bk=256, num_warps=8, num_stages=3)


def gemv_row(k: int) -> tuple[int, int]:
    """(KB, KXW) of a one-row GEMV over K inputs: the power-of-two span of its int8 row (at least one
    16-byte vector) and the 32-bit words it reads, K rounded up to whole 16-byte vectors."""
    return max(triton.next_power_of_2(k), 16), -(-k // 16) * 4


def _check(x: torch.Tensor, w: PackedWeight, act: str | None) -> tuple[int, int, int]:
    """(output columns, K, activation code) of a product; a gated one halves the weight's rows."""
    n_rows, k = w.shape
    if x.shape[-1] != k:
        raise ValueError(f"activations have {x.shape[-1]} columns, the weight has {k} inputs")
    if act is None:
        return n_rows, k, 0
    if act not in ACTIVATIONS or n_rows % 2:
        raise ValueError(f"a gated product needs act in {sorted(ACTIVATIONS)} and gate and up rows stacked")
    return n_rows // 2, k, ACTIVATIONS[act]


def _split_buffers(device: torch.device, m: int, n_cols: int, tiles: int, split_k: int):
    if split_k == 1:
        return None, None
    return scratch_buffer(device, split_k * m * n_cols, "acc"), scratch_buffer(device, tiles, "count")


def ternary_mm(
    xq: torch.Tensor,
    a: torch.Tensor,
    w: PackedWeight,
    out_dtype: torch.dtype = torch.bfloat16,
    *,
    residual: torch.Tensor | None = None,
    act: str | None = None,
    out: torch.Tensor | None = None,
    config: MMConfig | None = None,
    backend: str | None = None,
    codes: torch.Tensor | None = None,
) -> torch.Tensor:
    """epilogue(xq [M, K] int8 @ W.T) on tensor cores, W in "triton_i2" or an int8 weight (layout "int8").

    Epilogue: y = acc * (s / a) in `out_dtype`; with `act` ("relu2", "silu") W stacks gate and up rows and
    y = act(gate) * up; with `residual`, y = residual + y. Rounded at each step as the torch model rounds.
    `backend` (ternary weights): "i2", "int_mm" or "w8" (see EXPAND_MIN_ROWS); None chooses by rows.
    `codes`: W's codes kept as int8 (`expanded.int8_codes`, gated rows paired): the product runs on them
    ("w8", `config` its tiles), whatever the rows."""
    m = xq.shape[0]
    n, k, act_code = _check(xq, w, act)
    w8 = w.layout == "int8"
    if codes is not None:
        backend = "w8"
    elif backend is None:
        expand = EXPAND_MIN_ROWS is not None and m >= EXPAND_MIN_ROWS
        backend = EXPAND_BACKEND if expand else "i2"
    if backend not in MM_BACKENDS:
        raise ValueError(f"backend must be one of {MM_BACKENDS}, got {backend!r}")
    out = torch.empty((m, n), dtype=out_dtype, device=xq.device) if out is None else out
    if backend != "i2" and not w8:
        from .expanded import expanded_mm  # it builds on this module's kernels

        return expanded_mm(xq, a, w, out, n, act_code, residual, backend, config, codes)
    cfg = config or default_config(m, n, k, w8, act_code != 0)
    kw = w.data.shape[1]
    grid = (triton.cdiv(n, cfg.bn) * triton.cdiv(m, cfg.bm), cfg.split_k)
    ws, cnt = _split_buffers(xq.device, m, 2 * n if act_code else n, grid[0], cfg.split_k)
    _mm_kernel[grid](
        xq, a, w.data, w.scale, out, residual if residual is not None else out,
        ws if ws is not None else out, cnt if cnt is not None else out,
        m, n, k, kw, xq.stride(0), out.stride(0), residual.stride(0) if residual is not None else 0,
        BM=cfg.bm, BN=cfg.bn, BK=cfg.bk, SPLIT_K=cfg.split_k, GROUP_M=GROUP_M, W8=w8, PAIRED=False,
        ACT=act_code, RESIDUAL=residual is not None, ROW_SCALE=w.scale.numel() > 1, SWAP=cfg.swap and not w8,
        NATIVE=on_gpu(xq), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        **launch_kwargs(pdl_launch(xq)),
    )  # fmt: skip
    return out


def ternary_gemv(
    x: torch.Tensor,
    w: PackedWeight,
    *,
    a: torch.Tensor | None = None,
    gain: torch.Tensor | None = None,
    eps: float = 1e-5,
    out_dtype: torch.dtype | None = None,
    residual: torch.Tensor | None = None,
    act: str | None = None,
    out: torch.Tensor | None = None,
    config: MMConfig | None = None,
    use_asm: bool | None = None,
    then_quant: tuple[torch.Tensor | None, torch.Tensor, torch.Tensor] | None = None,
    residual_early: bool = False,
) -> torch.Tensor:
    """epilogue(x [1, K] @ W.T) for one row on the integer ALUs (`act`, `residual`: see ternary_mm). With `a`,
    x is int8 already quantized with scale a [1]; without, x is float and is quantized here (after RMSNorm
    with `gain` when given). `use_asm=False` replaces the inline PTX by plain Triton (the interpreter's
    path). `then_quant` = (gain or None, q int8 [1, N], a float32 [1]): also write the output row normalized
    (RMSNorm with gain, eps) and quantized into q and a, as norm_quant would (needs split_k 1).
    `residual_early`: the residual was written at least two launches before this one, so with programmatic
    dependent launch it is complete when this kernel starts (the launch before passed its own wait for the
    one before it) and a resident-program GEMV reads it before its wait (other configs ignore it)."""
    if x.shape[0] != 1:
        raise ValueError(f"ternary_gemv takes one row, got {x.shape[0]}")
    if w.layout != "triton_i2":
        raise ValueError(f"ternary_gemv takes the triton_i2 layout, got {w.layout!r}")
    n, k, act_code = _check(x, w, act)
    cfg = config or default_config(1, n, k, gated=act_code != 0)
    if cfg.bk % 128:
        raise ValueError(f"a GEMV config's bk must be a multiple of 128 (one code block), got {cfg.bk}")
    x_float = a is None
    out_dtype = out_dtype or (x.dtype if x_float else torch.bfloat16)
    out = torch.empty((1, n), dtype=out_dtype, device=x.device) if out is None else out
    if cfg.resident:
        if cfg.split_k != 1 or then_quant is not None:
            raise ValueError("a resident-program GEMV config takes split_k 1 and no then_quant")
        return _gemv_resident(x, w, a, gain, eps, residual, residual_early, act_code, out, cfg, use_asm)
    grid = (triton.cdiv(n, cfg.bn), cfg.split_k)
    ws, cnt = _split_buffers(x.device, 1, 2 * n if act_code else n, grid[0], cfg.split_k)
    private = x_float and cfg.private_row
    kb, kxw = gemv_row(k)
    x, q = _gemv_rows(x, x_float, kb, grid[0] * grid[1] if private else 1)
    g2, q2, a2 = then_quant or (None, out, out)
    if then_quant is not None and cfg.split_k != 1:
        raise ValueError("then_quant needs a config with split_k 1")
    tcnt = scratch_buffer(x.device, 1, "then_quant_count") if then_quant is not None else out
    _gemv_kernel[grid](
        x, gain if gain is not None else x, a if a is not None else x, q, w.data, w.scale, out,
        residual if residual is not None else out,
        ws if ws is not None else out, cnt if cnt is not None else out,
        g2 if g2 is not None else out, q2, a2, tcnt,
        n, k, w.data.shape[1], kxw, eps,
        BN=cfg.bn, BK=cfg.bk, KB=kb, SPLIT_K=cfg.split_k, X_FLOAT=x_float,
        NORM=gain is not None, ACT=act_code, RESIDUAL=residual is not None, ROW_SCALE=w.scale.numel() > 1,
        PRIVATE_ROW=private, THEN_QUANT=then_quant is not None, NORM2=g2 is not None,
        NB=triton.next_power_of_2(n),
        USE_ASM=on_gpu(x) if use_asm is None else use_asm, NATIVE=on_gpu(x),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **launch_kwargs(pdl_launch(x)),
    )  # fmt: skip
    return out


def int8_weight(weight: torch.Tensor) -> PackedWeight:
    """A float weight [N, K] as int8 with one absmax scale per output row (for the lm_head):
    real weight ≈ q * s, s = max|w_row| / 127. Not ternary: an approximation of the float weight."""
    wf = weight.detach().float()
    s = (wf.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    q = (wf / s[:, None]).round().clamp(-127, 127).to(torch.int8)
    return PackedWeight("int8", q.contiguous(), s, (int(weight.shape[0]), int(weight.shape[1])))

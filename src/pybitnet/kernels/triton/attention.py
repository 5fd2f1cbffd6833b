"""Decode attention for one new token per sequence: RoPE on q and k, the KV-cache write and attention over the
sequence's cached positions, in one launch. One program per sequence, KV head (its query heads together) and
split of the sequence: with SPLITS > 1 (flash-decoding) each program attends over its share of the positions
and writes a partial result (running max, sum, unnormalized output), and the splits are combined without a
second launch: where every program can be resident at once (batch 1 on a GPU, see `spins`) the splits of a
(sequence, head) wait for each other at an arrival counter and then each combines its share of the columns;
otherwise the last to arrive combines them all. Everything that does not depend on the previous kernel (the
positions, the RoPE tables, the first block of cached keys and values) is read before the
programmatic-dependent-launch wait.

RoPE rounds as the model's `apply_rope` does in the activation dtype (x*cos and rotated*sin each rounded, then
their sum); the scores and the softmax run in float32 with an online softmax, as flash attention does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (
    ROUND,
    Probe,
    arrive,
    dependency_wait,
    launch_kwargs,
    multiprocessors,
    on_gpu,
    pdl_launch,
    probe_stamp,
    round_to,
    scratch_buffer,
    wait_arrivals,
)

# launch shape by batch (rows <= 8: "small", else "large"): cache positions per loop step, warps, stages and
# sequence splits; benchmarks/gpu_bench.py measures the alternatives on an H200 (and uses the fastest for
# "large"), benchmarks/gpu_decode_timeline.py the small ones inside the whole decode step
DECODE_CONFIGS = {
    # batch 1, context 384, the whole decode step (benchmarks/gpu_decode_timeline.py): 939 µs against 967 for
    # 64 positions / 8 splits / 4 warps, the fastest alone (6.5 µs) but not inside the step; with the splits
    # combining together (`spins`), one stage: 660.3 µs against 669.6 for two, 674.3 for three
    "small": {"block": 32, "num_warps": 2, "num_stages": 1, "splits": 16},
    "large": {"block": 64, "num_warps": 4, "num_stages": 2, "splits": 1},  # 20.9 µs vs 22.0 for 128 / 8 warps
}


# Where a program's time goes (benchmarks/gpu_gemv_probe.py): the cycle counter at each step, the global timer
# at three (see `Probe`). "arrived": the split's partial stored and counted; "done": the program's end (after
# the combination, for the program that combines; splits past the sequence's end stamp only start, waited and
# done)
PROBE = Probe(("start", "waited", "roped", "attended", "arrived", "done", "global start", "global waited",
               "global done"))  # fmt: skip
_PROBE_STRIDE = tl.constexpr(len(PROBE.points))


@triton.jit
def _rope(ptrs, rot_ptrs, sign, cos, sin, mask, XDT: tl.constexpr, NATIVE: tl.constexpr):
    x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    rot = tl.load(rot_ptrs, mask=mask, other=0.0).to(tl.float32) * sign
    y = round_to(round_to(x * cos, XDT, NATIVE) + round_to(rot * sin, XDT, NATIVE), XDT, NATIVE)
    return y.to(XDT)


@triton.jit
def _combine_splits(part_ptr, ml_ptr, o_rows, n_active, sid, G: tl.constexpr, GR: tl.constexpr,
                    D: tl.constexpr, SPLITS: tl.constexpr, SHARE: tl.constexpr):  # fmt: skip
    """out = sum_s acc_s * exp(m_s - m) / sum_s l_s * exp(m_s - m) over the first n_active splits' partials
    (part [SPLITS, GR, D], ml [SPLITS, 2, GR]); with SHARE only split sid's share of the columns (D / SPLITS
    of them). .cg loads read L2, where the other programs' stores are."""
    sp = tl.arange(0, SPLITS)
    r = tl.arange(0, GR)
    if SHARE:  # noqa: SIM108 (a compile-time branch)
        d = sid * (D // SPLITS) + tl.arange(0, D // SPLITS)
    else:
        d = tl.arange(0, D)
    ok = (sp < n_active)[:, None] & (r < G)[None, :]
    m_s = tl.load(ml_ptr + sp[:, None] * (2 * GR) + r[None, :], mask=ok, other=float("-inf"),
                  cache_modifier=".cg")  # fmt: skip
    l_s = tl.load(ml_ptr + sp[:, None] * (2 * GR) + GR + r[None, :], mask=ok, other=0.0, cache_modifier=".cg")
    acc_s = tl.load(part_ptr + (sp[:, None, None] * GR + r[None, :, None]) * D + d[None, None, :],
                    mask=ok[:, :, None], other=0.0, cache_modifier=".cg")  # fmt: skip
    m = tl.max(m_s, axis=0)
    w = tl.where(ok, tl.exp(m_s - m[None, :]), 0.0)
    l_sum = tl.sum(l_s * w, axis=0)
    out = tl.sum(acc_s * w[:, :, None], axis=0) / l_sum[:, None]
    tl.store(o_rows + r[:, None] * D + d[None, :], out.to(o_rows.dtype.element_ty), mask=(r < G)[:, None])
    return out


@triton.jit
def _kv_block(k_base, v_base, sp, s_ok, stride_cs, d, xdt: tl.constexpr):
    """Cached keys and values [BS, D] of positions sp (zeros where not s_ok)."""
    offs = sp[:, None] * stride_cs + d[None, :]
    kt = tl.load(k_base + offs, mask=s_ok[:, None], other=0.0).to(xdt)
    vt = tl.load(v_base + offs, mask=s_ok[:, None], other=0.0).to(xdt)
    return kt, vt


@triton.jit
def _attend(q, kt, vt, s_ok, m_i, l_i, acc, sm_scale, xdt: tl.constexpr, IEEE: tl.constexpr,
            NATIVE: tl.constexpr):  # fmt: skip
    """One block of cached positions into the online softmax: (m_i, l_i, acc) updated with keys kt and values
    vt [BS, D] of the positions where s_ok."""
    if IEEE or not NATIVE:  # float32 products; the interpreter's dot mishandles bfloat16
        scores = tl.dot(q.to(tl.float32), tl.trans(kt.to(tl.float32)), input_precision="ieee")
    else:
        scores = tl.dot(q, tl.trans(kt))
    scores = tl.where(s_ok[None, :], scores * sm_scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    alpha = tl.exp(m_i - m_new)
    p = tl.exp(scores - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if IEEE or not NATIVE:
        pv = tl.dot(p.to(xdt).to(tl.float32), vt.to(tl.float32), input_precision="ieee")
    else:
        pv = tl.dot(p.to(xdt), vt)
    return m_new, l_i, acc * alpha[:, None] + pv


@triton.jit
def _decode_attention_kernel(
    qkv_ptr, cos_ptr, sin_ptr, pos_ptr, k_ptr, v_ptr, o_ptr, part_ptr, ml_ptr, cnt_ptr, probe_ptr,
    stride_qkv, stride_cb, stride_ch, stride_cs, stride_o, sm_scale,
    H: tl.constexpr, KVH: tl.constexpr, D: tl.constexpr, GP: tl.constexpr, GR: tl.constexpr,
    BS: tl.constexpr, SPLITS: tl.constexpr, IEEE: tl.constexpr, NATIVE: tl.constexpr, PDL: tl.constexpr,
    SPIN: tl.constexpr, PROBE: tl.constexpr,
):  # fmt: skip
    b, g, sid = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    _attention_program(
        b, g, sid, qkv_ptr, cos_ptr, sin_ptr, pos_ptr, k_ptr, v_ptr, o_ptr, part_ptr, ml_ptr, cnt_ptr,
        stride_qkv, stride_cb, stride_ch, stride_cs, stride_o, sm_scale, H, KVH, D, GP, GR, BS, SPLITS, IEEE,
        NATIVE, PDL, False, o_ptr, 0, SPIN, PROBE,
        probe_ptr + ((b * tl.num_programs(1) + g) * tl.num_programs(2) + sid) * _PROBE_STRIDE,
    )  # fmt: skip


@triton.jit
def _attention_program(
    b, g, sid, qkv_ptr, cos_ptr, sin_ptr, pos_ptr, k_ptr, v_ptr, o_ptr, part_ptr, ml_ptr, cnt_ptr,
    stride_qkv, stride_cb, stride_ch, stride_cs, stride_o, sm_scale,
    H: tl.constexpr, KVH: tl.constexpr, D: tl.constexpr, GP: tl.constexpr, GR: tl.constexpr,
    BS: tl.constexpr, SPLITS: tl.constexpr, IEEE: tl.constexpr, NATIVE: tl.constexpr, PDL: tl.constexpr,
    BAR: tl.constexpr, bar_ptr, bar_target, SPIN: tl.constexpr = False, PROBE: tl.constexpr = False,
    stamps=None,
):  # fmt: skip
    """Sequence b, KV head g, split sid of `_decode_attention_kernel`, as a function so that a persistent
    kernel can run several in a loop (decode_layer.py). BAR: q, k and v are ready at a grid barrier (bar_ptr
    reaching bar_target), which this program passes after its reads of older cache entries. PROBE: timestamps
    of the program's steps into stamps (see `PROBE`)."""
    G: tl.constexpr = H // KVH
    xdt = qkv_ptr.dtype.element_ty
    # Before the wait for the previous kernel (the q/k/v projection, see pdl_gate): the positions (written
    # before that kernel started), the RoPE tables and the first block of this split's cached keys and values
    # older than the new token, so their reads overlap the projection's end.
    probe_stamp(stamps, 0, sid, PROBE, 6)
    pos = tl.load(pos_ptr + b)
    # positions 0..pos in splits of `chunk` (a multiple of BS); splits past the end have nothing to do
    chunk = tl.cdiv(tl.cdiv(pos + 1, SPLITS), BS) * BS
    n_active = tl.cdiv(pos + 1, chunk)
    start = sid * chunk
    d = tl.arange(0, D)
    k_base = k_ptr + b.to(tl.int64) * stride_cb + g * stride_ch
    v_base = v_ptr + b.to(tl.int64) * stride_cb + g * stride_ch
    sp0 = start + tl.arange(0, BS)
    kt0, vt0 = _kv_block(k_base, v_base, sp0, sp0 < pos, stride_cs, d, xdt)
    cos = tl.load(cos_ptr + pos * D + d).to(tl.float32)
    sin = tl.load(sin_ptr + pos * D + d).to(tl.float32)
    dependency_wait(PDL, BAR, bar_ptr, bar_target)
    probe_stamp(stamps, 1, sid, PROBE, 7)
    done = sid
    pair = b * KVH + g
    part = part_ptr + pair.to(tl.int64) * (SPLITS * GR * D)
    ml = ml_ptr + pair.to(tl.int64) * (SPLITS * 2 * GR)
    o_rows = o_ptr + b.to(tl.int64) * stride_o + g * G * D
    if start <= pos:
        rot = (d + D // 2) % D
        sign = tl.where(d < D // 2, -1.0, 1.0)
        row = qkv_ptr + b.to(tl.int64) * stride_qkv
        if pos < start + chunk:  # the split holding the new position writes its key and value
            k_col = row + (H + g) * D
            k_new = _rope(k_col + d, k_col + rot, sign, cos, sin, d < D, xdt, NATIVE)
            v_new = tl.load(row + (H + KVH + g) * D + d)
            tl.store(k_base + pos * stride_cs + d, k_new.to(k_ptr.dtype.element_ty))
            tl.store(v_base + pos * stride_cs + d, v_new.to(v_ptr.dtype.element_ty))
            # the first block read the cache before the new key and value: put them in as stored
            new = (sp0 == pos)[:, None]
            kt0 = tl.where(new, k_new.to(k_ptr.dtype.element_ty).to(xdt)[None, :], kt0)
            vt0 = tl.where(new, v_new.to(v_ptr.dtype.element_ty).to(xdt)[None, :], vt0)

        hq = tl.arange(0, GP)
        q_ok = hq < G
        q_rows = row + (g * G + hq)[:, None] * D
        q = _rope(q_rows + d[None, :], q_rows + rot[None, :], sign[None, :], cos[None, :], sin[None, :],
                  q_ok[:, None], xdt, NATIVE)  # fmt: skip
        if PROBE:
            probe_stamp(stamps, 2, tl.sum(tl.sum(q.to(tl.float32), axis=1), axis=0), PROBE)
        tl.debug_barrier()  # the new key and value are in the cache before the block reads them back

        m_i = tl.full((GP,), float("-inf"), tl.float32)
        l_i = tl.zeros((GP,), tl.float32)
        acc = tl.zeros((GP, D), tl.float32)
        m_i, l_i, acc = _attend(q, kt0, vt0, sp0 <= pos, m_i, l_i, acc, sm_scale, xdt, IEEE, NATIVE)
        for s0 in range(start + BS, tl.minimum(start + chunk, pos + 1), BS):
            sp = s0 + tl.arange(0, BS)
            s_ok = sp <= pos
            kt, vt = _kv_block(k_base, v_base, sp, s_ok, stride_cs, d, xdt)
            m_i, l_i, acc = _attend(q, kt, vt, s_ok, m_i, l_i, acc, sm_scale, xdt, IEEE, NATIVE)
        if PROBE:
            probe_stamp(stamps, 3, tl.sum(l_i, axis=0), PROBE)
        if SPLITS == 1:
            out = acc / l_i[:, None]
            tl.store(
                o_rows + hq[:, None] * D + d[None, :], out.to(o_ptr.dtype.element_ty), mask=q_ok[:, None]
            )
        else:
            tl.store(part + (sid * GR + hq[:, None]) * D + d[None, :], acc, mask=q_ok[:, None])
            tl.store(ml + sid * 2 * GR + hq, m_i, mask=q_ok)
            tl.store(ml + sid * 2 * GR + GR + hq, l_i, mask=q_ok)
    if SPLITS > 1:  # every split arrives, those past the end too
        before, last = arrive(cnt_ptr + pair, ROUND // SPLITS)
        probe_stamp(stamps, 4, before, PROBE)
        done = before
        if SPIN:  # the splits wait for each other, then each combines its share of the columns
            wait_arrivals(cnt_ptr + pair, before, ROUND // SPLITS)
        if last or SPIN:
            out = _combine_splits(part, ml, o_rows, n_active, sid, G, GR, D, SPLITS, SPIN)
            if PROBE:
                done = tl.sum(tl.sum(out, axis=1), axis=0).to(tl.int32, bitcast=True)
    probe_stamp(stamps, 5, done, PROBE, 8)


def split_workspace(device: torch.device, pairs: int, splits: int, gr: int, d: int):
    """(partial outputs, running max / sum, arrival counters) of split attention over `pairs` (sequence, KV
    head) pairs: shared scratch; the counters count arrivals as `common.arrive` does (no reset)."""
    ws = scratch_buffer(device, pairs * splits * gr * (d + 2), "attn").view(torch.float32)
    return ws, ws[pairs * splits * gr * d :], scratch_buffer(device, pairs, "attn_count")


def decode_attention(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    out: torch.Tensor | None = None,
    block: int | None = None,
    splits: int | None = None,
    spin: bool | None = None,
) -> torch.Tensor:
    """qkv [B, (H + 2 KVH) D] (q, k, v of one new token per row, before RoPE); cos, sin [max_len, D];
    positions [B] int32 (where each row's token goes); k_cache, v_cache [B', KVH, max_len, D] (one layer).
    Writes the roped key and the value into the caches and returns attention [B, H D] in qkv's dtype.
    `block`, `splits` (a power of two): override DECODE_CONFIGS. `spin`: how split partials are combined (see
    `spins`; None decides)."""
    b = qkv.shape[0]
    d = cos.shape[-1]
    cfg = DECODE_CONFIGS["small" if b <= 8 else "large"]
    n_split = splits or cfg.get("splits", 1)
    if n_split & (n_split - 1) or n_split > ROUND:
        raise ValueError(f"splits must be a power of two up to {ROUND.value}, not {n_split}")
    out = torch.empty((b, num_heads * d), dtype=qkv.dtype, device=qkv.device) if out is None else out
    group = num_heads // num_kv_heads
    gr = triton.next_power_of_2(group)
    part = ml = cnt = out
    if n_split > 1:
        part, ml, cnt = split_workspace(qkv.device, b * num_kv_heads, n_split, gr, d)
    grid = (b, num_kv_heads, n_split)
    if spin is None:
        spin = spins(qkv, grid, d)
    elif spin and not spins(qkv, grid, d):
        raise ValueError(
            f"grid {grid} with {d}-wide heads cannot spin: that needs a GPU, heads a multiple of the splits "
            "wide and at most one program a multiprocessor (see attention.spins)"
        )
    probe = PROBE.row(qkv)
    _decode_attention_kernel[grid](
        qkv, cos, sin, positions, k_cache, v_cache, out, part, ml, cnt, probe if probe is not None else out,
        qkv.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), out.stride(0), d**-0.5,
        H=num_heads, KVH=num_kv_heads, D=d, GP=max(16, gr), GR=gr, BS=block or cfg["block"], SPLITS=n_split,
        IEEE=qkv.dtype == torch.float32, NATIVE=on_gpu(qkv), SPIN=spin,
        PROBE=probe is not None, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        **launch_kwargs(pdl_launch(qkv)),
    )  # fmt: skip
    return out


# Module switch for `spins`: off, the last split to arrive always combines (e.g. under CUDA MPS with a limit
# on the multiprocessors a process may use, where the device's count overstates what can be resident).
SPIN = True


def spins(qkv: torch.Tensor, grid: tuple[int, int, int], d: int) -> bool:
    """Whether the splits of each (sequence, KV head) wait for each other and then combine a D / SPLITS
    share of the columns each, instead of the last to arrive combining all of them: one short read of L2
    a program instead of one long one (2B-4T at batch 1 on an H200: the combination 1.39 µs instead of
    1.91, the decode step 674 µs instead of 700; benchmarks/gpu_gemv_probe.py, gpu_ab.sh). Only on a GPU,
    with at most one program a multiprocessor (a waiting program holds its multiprocessor, so all must be
    resident; the interpreter runs programs one after another) and D a multiple of the splits."""
    splits = grid[2]
    programs = grid[0] * grid[1] * splits
    return (
        SPIN and splits > 1 and d % splits == 0 and on_gpu(qkv)
        and programs <= multiprocessors(qkv.device.index if qkv.device.index is not None else 0)
    )  # fmt: skip

"""One decoder layer of a one-row decode step in one persistent launch.

At batch 1 a layer is five dependent kernels (q/k/v GEMV, attention, o GEMV, gate/up GEMV, down GEMV) whose
weights take ~4 µs to read on an H200 while the chain takes ~33 µs: launch and dependency latency, not
bandwidth. Here the same programs run as phases of one launch of P programs (P at most the number of
multiprocessors, so all are resident), each phase a loop of the existing per-tile code over the programs:

1. q/k/v: RMSNorm(x) and int8 quantization, the W2A8 GEMV tiles (`_gemv_program`) -> qkv
2. attention: RoPE, the KV-cache write, split attention; the last split of a KV head combines them
   (`_attention_program`)
3. o: the attention sub-norm and quantization, GEMV, + x -> h
4. gate/up: norm(h), GEMV, act(gate) * up -> gu
5. down: the feed-forward sub-norm, GEMV, + h -> out

The same functions compute each value, so the result is bit-identical to the five launches. On the GPU the
phases are separated by grid-wide barriers on an arrival counter per layer that only grows (each launch adds
4 P; a program derives its launch's base from the value it reads at its start, before any program can pass
the first barrier); the launch is cooperative, so the driver guarantees that all P programs are resident
(or refuses the launch) and a barrier cannot wait for a program that never runs. The interpreter runs
programs one after another, so no program could wait for another: there (or with `fused=False`) each phase
is its own launch of the same kernel.

Opt-in (`GpuForward(layer_kernel=True)`), because on an H200 it is slower: 496 tok/s against 1,520 for the
five launches a layer (benchmarks/gpu_bench.py, 2026-12-01; 658-694 against 1,108 when first measured;
benchmarks/gpu_layer_kernel.py for its variants). A
grid barrier costs ~0.8 µs, so most of the loss is elsewhere: with programmatic dependent launch a kernel's
programs start (and request their weights) while the kernel before still runs, on the same multiprocessors;
one program per multiprocessor has no such overlap across phases. Halving the code (`overlap=False`), two
programs per multiprocessor at 128 registers (spills) and requesting the later phases' weights into L2 at the
start were measured, none faster.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...quant import PackedWeight
from .attention import DECODE_CONFIGS, _attention_program, split_workspace
from .common import (
    ACTIVATIONS,
    dependency_wait,
    grid_barrier,
    launch_kwargs,
    multiprocessors,
    on_gpu,
    pdl_launch,
    scratch_buffer,
)
from .matmul import _gemv_program, default_config, gemv_row

PHASES = 5
NUM_WARPS = 8  # one launch shape for every phase (the separate one-row GEMVs use 8 or 16 warps)


@triton.jit
def _gemv_phase(
    pid, n_prog, x_ptr, g_ptr, row, w_ptr, s_ptr, o_ptr, r_ptr, N, K, KW, KXW, eps,
    BN: tl.constexpr, BK: tl.constexpr, KB: tl.constexpr, NORM: tl.constexpr, ACT: tl.constexpr,
    RESIDUAL: tl.constexpr, ROW_SCALE: tl.constexpr, USE_ASM: tl.constexpr, NATIVE: tl.constexpr,
    L2_IN: tl.constexpr, PDL: tl.constexpr, BAR: tl.constexpr, bar_ptr, bar_target, OVERLAP: tl.constexpr,
):  # fmt: skip
    """The output tiles pid, pid + n_prog, ... of a one-row GEMV of the float row x (normalized with gain g
    when NORM, quantized into this program's row). A program's first tile waits for the inputs (PDL: the
    previous kernel; BAR: the grid barrier, which a program without tiles still arrives at) after it has
    requested its weights; without OVERLAP every program waits first (one copy of the tile code, not two)."""
    n_tiles = tl.cdiv(N, BN)
    first = pid + n_prog
    if not OVERLAP:
        dependency_wait(PDL, BAR, bar_ptr, bar_target)
        first = pid
    elif pid < n_tiles:
        _gemv_program(
            pid, 0, 1, x_ptr, g_ptr, x_ptr, row, w_ptr, s_ptr, o_ptr, r_ptr, o_ptr, o_ptr, o_ptr, o_ptr,
            o_ptr, o_ptr, N, K, KW, KXW, eps, BN, BK, KB, 1, True, NORM, ACT, RESIDUAL, ROW_SCALE, False,
            False, False, 16, USE_ASM, NATIVE, PDL, L2_IN, BAR, bar_ptr, bar_target,
        )  # fmt: skip
    elif BAR:
        grid_barrier(bar_ptr, bar_target)
    for t in range(first, n_tiles, n_prog):
        _gemv_program(
            t, 0, 1, x_ptr, g_ptr, x_ptr, row, w_ptr, s_ptr, o_ptr, r_ptr, o_ptr, o_ptr, o_ptr, o_ptr, o_ptr,
            o_ptr, N, K, KW, KXW, eps, BN, BK, KB, 1, True, NORM, ACT, RESIDUAL, ROW_SCALE, False, False,
            False, 16, USE_ASM, NATIVE, False, L2_IN, False, bar_ptr, bar_target,
        )  # fmt: skip


@triton.jit
def _attention_phase(
    pid, n_prog, qkv_ptr, cos_ptr, sin_ptr, pos_ptr, k_ptr, v_ptr, o_ptr, part_ptr, ml_ptr, cnt_ptr,
    stride_cb, stride_ch, stride_cs, sm_scale,
    H: tl.constexpr, KVH: tl.constexpr, D: tl.constexpr, GP: tl.constexpr, GR: tl.constexpr,
    BS: tl.constexpr, SPLITS: tl.constexpr, IEEE: tl.constexpr, NATIVE: tl.constexpr,
    PDL: tl.constexpr, BAR: tl.constexpr, bar_ptr, bar_target, OVERLAP: tl.constexpr,
):  # fmt: skip
    """The (KV head, split) items pid, pid + n_prog, ... of one sequence's decode attention; the first waits
    for q, k and v as in `_gemv_phase`, after reading the older cache entries it needs."""
    first = pid + n_prog
    if not OVERLAP:
        dependency_wait(PDL, BAR, bar_ptr, bar_target)
        first = pid
    elif pid < KVH * SPLITS:
        _attention_program(
            pid * 0, pid // SPLITS, pid % SPLITS, qkv_ptr, cos_ptr, sin_ptr, pos_ptr, k_ptr, v_ptr, o_ptr,
            part_ptr, ml_ptr, cnt_ptr, 0, stride_cb, stride_ch, stride_cs, 0, sm_scale, H, KVH, D, GP, GR, BS,
            SPLITS, IEEE, NATIVE, PDL, BAR, bar_ptr, bar_target,
        )  # fmt: skip
    elif BAR:
        grid_barrier(bar_ptr, bar_target)
    for item in range(first, KVH * SPLITS, n_prog):
        _attention_program(
            pid * 0, item // SPLITS, item % SPLITS, qkv_ptr, cos_ptr, sin_ptr, pos_ptr, k_ptr, v_ptr, o_ptr,
            part_ptr, ml_ptr, cnt_ptr, 0, stride_cb, stride_ch, stride_cs, 0, sm_scale, H, KVH, D, GP, GR, BS,
            SPLITS, IEEE, NATIVE, False, False, bar_ptr, bar_target,
        )  # fmt: skip


@triton.jit
def _decode_layer_kernel(
    x_ptr, h_ptr, out_ptr, qkv_ptr, attn_ptr, gu_ptr, row_ptr,
    ln1_ptr, wqkv_ptr, sqkv_ptr, an_ptr, wo_ptr, so_ptr, ln2_ptr, wgu_ptr, sgu_ptr, fn_ptr, wd_ptr, sd_ptr,
    cos_ptr, sin_ptr, pos_ptr, k_ptr, v_ptr, part_ptr, ml_ptr, acnt_ptr, bar_ptr,
    HID, QKV_N, QD, INTER, KW_H, KW_Q, KW_I, KXW_H, KXW_Q, KXW_I, stride_cb, stride_ch, stride_cs, eps,
    sm_scale,
    BN1: tl.constexpr, BK1: tl.constexpr, BN3: tl.constexpr, BK3: tl.constexpr, BN4: tl.constexpr,
    BK4: tl.constexpr, BN5: tl.constexpr, BK5: tl.constexpr,
    KB_H: tl.constexpr, KB_Q: tl.constexpr, KB_I: tl.constexpr, KB_ROW: tl.constexpr,
    NORM1: tl.constexpr, NORM3: tl.constexpr, NORM4: tl.constexpr, NORM5: tl.constexpr, ACT: tl.constexpr,
    RS1: tl.constexpr, RS3: tl.constexpr, RS4: tl.constexpr, RS5: tl.constexpr,
    H: tl.constexpr, KVH: tl.constexpr, D: tl.constexpr, GP: tl.constexpr, GR: tl.constexpr,
    BS: tl.constexpr, SPLITS: tl.constexpr, IEEE: tl.constexpr,
    FIRST: tl.constexpr, LAST: tl.constexpr, FUSED: tl.constexpr,
    USE_ASM: tl.constexpr, NATIVE: tl.constexpr, PDL: tl.constexpr, OVERLAP: tl.constexpr,
):  # fmt: skip
    """Phases FIRST..LAST of one layer (see the module docstring); FUSED: all five, a grid barrier before each
    of phases 2-5 (inside each program's first work item, after its reads that do not depend on the phase
    before). The launch's first phase waits for the previous kernel (PDL) the same way. Every program
    quantizes its GEMV inputs into its own row at row_ptr (KB_ROW bytes)."""
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    row = row_ptr + pid.to(tl.int64) * KB_ROW
    base = 0
    if FUSED:
        quota = n_prog.to(tl.int64) * 4  # each program arrives at four barriers a launch
        base = tl.atomic_add(bar_ptr, 0, sem="acquire") // quota * quota
    if FIRST <= 1 and LAST >= 1:
        _gemv_phase(pid, n_prog, x_ptr, ln1_ptr, row, wqkv_ptr, sqkv_ptr, qkv_ptr, qkv_ptr, QKV_N, HID, KW_H,
                    KXW_H, eps, BN1, BK1, KB_H, NORM1, 0, False, RS1, USE_ASM, NATIVE, False, PDL, False,
                    bar_ptr, base, OVERLAP)  # fmt: skip
    if FIRST <= 2 and LAST >= 2:
        _attention_phase(pid, n_prog, qkv_ptr, cos_ptr, sin_ptr, pos_ptr, k_ptr, v_ptr, attn_ptr, part_ptr,
                         ml_ptr, acnt_ptr, stride_cb, stride_ch, stride_cs, sm_scale, H, KVH, D, GP, GR, BS,
                         SPLITS, IEEE, NATIVE, PDL and FIRST == 2, FUSED, bar_ptr, base + n_prog,
                         OVERLAP)  # fmt: skip
    if FIRST <= 3 and LAST >= 3:  # + x
        _gemv_phase(pid, n_prog, attn_ptr, an_ptr, row, wo_ptr, so_ptr, h_ptr, x_ptr, HID, QD, KW_Q, KXW_Q,
                    eps, BN3, BK3, KB_Q, NORM3, 0, True, RS3, USE_ASM, NATIVE, FUSED, PDL and FIRST == 3,
                    FUSED, bar_ptr, base + 2 * n_prog, OVERLAP)  # fmt: skip
    if FIRST <= 4 and LAST >= 4:  # act(gate) * up
        _gemv_phase(pid, n_prog, h_ptr, ln2_ptr, row, wgu_ptr, sgu_ptr, gu_ptr, gu_ptr, INTER, HID, KW_H,
                    KXW_H, eps, BN4, BK4, KB_H, NORM4, ACT, False, RS4, USE_ASM, NATIVE, FUSED,
                    PDL and FIRST == 4, FUSED, bar_ptr, base + 3 * n_prog, OVERLAP)  # fmt: skip
    if FIRST <= 5 and LAST >= 5:  # + h
        _gemv_phase(pid, n_prog, gu_ptr, fn_ptr, row, wd_ptr, sd_ptr, out_ptr, h_ptr, HID, INTER, KW_I, KXW_I,
                    eps, BN5, BK5, KB_I, NORM5, 0, True, RS5, USE_ASM, NATIVE, FUSED, PDL and FIRST == 5,
                    FUSED, bar_ptr, base + 4 * n_prog, OVERLAP)  # fmt: skip


def _tile(n: int, k: int, gated: bool) -> tuple[int, int]:
    """(rows, K block) of the one-row GEMV tiles the separate launches would use for this product."""
    cfg = default_config(1, n, k, gated=gated)
    return cfg.bn, cfg.bk


def decode_layer(
    x: torch.Tensor,
    weights: tuple,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    eps: float,
    act: str,
    barrier: torch.Tensor,
    programs: int | None = None,
    fused: bool | None = None,
    maxnreg: int | None = None,
    overlap: bool = True,
) -> torch.Tensor:
    """The layer's output row [1, hidden] for the input row x [1, hidden] (one token at positions [1]), as the
    five launches q/k/v GEMV -> decode_attention -> o GEMV (+ x) -> gate/up GEMV -> down GEMV (+ h) give it.

    weights = (ln1, qkv, attn_norm, o, ln2, gate_up, ffn_norm, down): gains (None: no norm) and "triton_i2"
    weights as the engine holds them (q/k/v and gate/up rows stacked). barrier: this layer's int64 arrival
    counter (zero at first, then left as the launches leave it; every fused launch on one counter must use
    the same number of programs, as the default does for a model's layers). programs: P (default: the
    multiprocessor count, at most the most work items of a phase); fused: one launch with barriers (default
    on a GPU); maxnreg: a cap on registers per thread (128 lets two programs share a multiprocessor); overlap:
    each program's first work item of a phase requests its weights before the wait (else the wait comes first
    and each phase's code exists once, not twice)."""
    ln1, w_qkv, attn_norm, w_o, ln2, w_gu, ffn_norm, w_down = weights
    if x.shape[0] != 1:
        raise ValueError(f"decode_layer takes one row, got {x.shape[0]}")
    for w in (w_qkv, w_o, w_gu, w_down):
        if not isinstance(w, PackedWeight) or w.layout != "triton_i2":
            raise ValueError("decode_layer takes weights in the triton_i2 layout")
    hid = x.shape[1]
    qkv_n, qd, inter = w_qkv.shape[0], w_o.shape[1], w_gu.shape[0] // 2
    d = cos.shape[-1]
    group = num_heads // num_kv_heads
    gr = triton.next_power_of_2(group)
    attn_cfg = DECODE_CONFIGS["small"]
    splits = attn_cfg["splits"]
    dev = x.device
    native = on_gpu(x)
    fused = native if fused is None else fused
    gemvs = {1: (qkv_n, hid, False), 3: (hid, qd, False), 4: (inter, hid, True), 5: (hid, inter, False)}
    tiles = {phase: _tile(*shape) for phase, shape in gemvs.items()}
    work = max(num_kv_heads * splits, *(-(-gemvs[p][0] // tiles[p][0]) for p in gemvs))
    if programs is None:
        programs = multiprocessors(dev.index if dev.index is not None else 0) if native else 4
    programs = max(1, min(programs, work))
    (kb_h, kxw_h), (kb_q, kxw_q), (kb_i, kxw_i) = gemv_row(hid), gemv_row(qd), gemv_row(inter)
    kb_row = max(kb_h, kb_q, kb_i)
    row = scratch_buffer(dev, programs * kb_row // 4, "layer_rows").view(torch.int8)
    part, ml, acnt = split_workspace(dev, num_kv_heads, splits, gr, d)
    qkv = torch.empty((1, qkv_n), dtype=x.dtype, device=dev)
    attn = torch.empty((1, num_heads * d), dtype=x.dtype, device=dev)
    h = torch.empty_like(x)
    gu = torch.empty((1, inter), dtype=x.dtype, device=dev)
    out = torch.empty_like(x)
    args = (
        x, h, out, qkv, attn, gu, row,
        ln1 if ln1 is not None else x, w_qkv.data, w_qkv.scale, attn_norm if attn_norm is not None else x,
        w_o.data, w_o.scale, ln2 if ln2 is not None else x, w_gu.data, w_gu.scale,
        ffn_norm if ffn_norm is not None else x, w_down.data, w_down.scale,
        cos, sin, positions, k_cache, v_cache, part, ml, acnt, barrier,
        hid, qkv_n, qd, inter, w_qkv.data.shape[1], w_o.data.shape[1], w_down.data.shape[1],
        kxw_h, kxw_q, kxw_i,
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), eps, d**-0.5,
    )  # fmt: skip
    consts = dict(
        BN1=tiles[1][0], BK1=tiles[1][1], BN3=tiles[3][0], BK3=tiles[3][1], BN4=tiles[4][0], BK4=tiles[4][1],
        BN5=tiles[5][0], BK5=tiles[5][1], KB_H=kb_h, KB_Q=kb_q, KB_I=kb_i, KB_ROW=kb_row,
        NORM1=ln1 is not None, NORM3=attn_norm is not None, NORM4=ln2 is not None, NORM5=ffn_norm is not None,
        ACT=ACTIVATIONS[act], RS1=w_qkv.scale.numel() > 1, RS3=w_o.scale.numel() > 1,
        RS4=w_gu.scale.numel() > 1, RS5=w_down.scale.numel() > 1,
        H=num_heads, KVH=num_kv_heads, D=d, GP=max(16, gr), GR=gr, BS=attn_cfg["block"], SPLITS=splits,
        IEEE=x.dtype == torch.float32, USE_ASM=native, NATIVE=native, OVERLAP=overlap, num_warps=NUM_WARPS,
        num_stages=1,
    )  # fmt: skip
    if maxnreg is not None and native:
        consts["maxnreg"] = maxnreg
    if fused:  # cooperative: if the P programs cannot all be resident the driver refuses it (no hang)
        _decode_layer_kernel[(programs,)](
            *args, FIRST=1, LAST=PHASES, FUSED=True, **consts, **launch_kwargs(pdl_launch(x)),
            launch_cooperative_grid=True,
        )  # fmt: skip
    else:
        for phase in range(1, PHASES + 1):
            _decode_layer_kernel[(programs,)](
                *args, FIRST=phase, LAST=phase, FUSED=False, **consts, **launch_kwargs(pdl_launch(x))
            )
    return out

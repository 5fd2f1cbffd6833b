"""Row-wise argmax of logits in one launch, and greedy decoding's step bookkeeping fused into it.

torch's argmax reduces a [1, 128256] row with too few programs (~36 µs on an H200, more than a third of the
output head's own time); here each row is split over many programs, each writes its best (value, index), and
the last program of the row to arrive (an arrival counter decides, as in split decode attention) reduces the
partials. Ties and NaN follow torch: the first index of the maximum, and a NaN counts as larger than any
number (the first NaN wins).

`greedy_advance` also does what a greedy decode step does after the argmax: the token becomes the next input,
goes into the row's history at the step index, the row's position moves on, and the step index moves on once
all rows are done; four small launches fewer a step.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import launch_kwargs, pdl_gate, pdl_launch, scratch_buffer

BLOCK = 1024  # logits a program reads per loop step
MAX_CHUNKS = 64  # programs per row


@triton.jit
def _order_key(v):
    """float32 -> int32 in the order torch's argmax sees: -0.0 equal to 0.0, any NaN above +inf."""
    v = tl.where(v == 0.0, 0.0, v)
    bits = v.to(tl.int32, bitcast=True)
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # negative floats: larger magnitude, smaller key
    return tl.where(v != v, 2147483647, key)


@triton.jit
def _first_max(key, idx):
    """(largest key, smallest index holding it) of 1-D key / index tensors."""
    best = tl.max(key, axis=0)
    return best, tl.min(tl.where(key == best, idx, 2147483647), axis=0)


@triton.jit
def _argmax_kernel(
    x_ptr, stride_x, V, chunk, pk_ptr, pi_ptr, cnt_ptr, tok_ptr, hist_ptr, stride_h, step_ptr, pos_ptr,
    n_rows,
    BLOCK: tl.constexpr, CHUNKS: tl.constexpr, ADVANCE: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    c = tl.program_id(1)
    pdl_gate(PDL)
    base = x_ptr + row.to(tl.int64) * stride_x
    start = c * chunk
    end = tl.minimum(start + chunk, V)
    # per lane: the best key so far and its index (a later index replaces it only with a larger key; no
    # float's key is the int32 minimum that masked lanes get)
    best_k = tl.full((BLOCK,), -2147483648, tl.int32)
    best_i = tl.full((BLOCK,), 2147483647, tl.int32)
    for s in range(start, end, BLOCK):
        offs = s + tl.arange(0, BLOCK)
        ok = offs < end
        key = tl.where(ok, _order_key(tl.load(base + offs, mask=ok, other=0.0).to(tl.float32)), -2147483648)
        take = key > best_k
        best_k = tl.where(take, key, best_k)
        best_i = tl.where(take, offs, best_i)
    bk, bi = _first_max(best_k, best_i)
    slot = row * CHUNKS + c
    tl.store(pk_ptr + slot, bk)
    tl.store(pi_ptr + slot, bi)
    tl.debug_barrier()  # the partial is stored before the arrival is counted
    arrived = tl.atomic_add(cnt_ptr + row, 1)
    if arrived == CHUNKS - 1:
        tl.atomic_xchg(cnt_ptr + row, 0)
        parts = row * CHUNKS + tl.arange(0, CHUNKS)
        keys = tl.load(pk_ptr + parts, cache_modifier=".cg")  # the other programs' stores are in L2
        _, token = _first_max(keys, tl.load(pi_ptr + parts, cache_modifier=".cg"))
        tl.store(tok_ptr + row, token.to(tok_ptr.dtype.element_ty))
        if ADVANCE:
            step = tl.load(step_ptr)
            tl.store(hist_ptr + row.to(tl.int64) * stride_h + step, token.to(hist_ptr.dtype.element_ty))
            tl.store(pos_ptr + row, tl.load(pos_ptr + row) + 1)
            if n_rows == 1:  # the only row: no count to wait for (one round trip to L2 less)
                tl.store(step_ptr, step + 1)
            else:
                done = tl.atomic_add(cnt_ptr + n_rows, 1)  # rows finished; the last one moves the step on
                if done == n_rows - 1:
                    tl.atomic_xchg(cnt_ptr + n_rows, 0)
                    tl.store(step_ptr, step + 1)


def _launch(x: torch.Tensor, tokens: torch.Tensor, advance: tuple | None) -> torch.Tensor:
    if x.dim() != 2 or x.shape[1] == 0:
        raise ValueError(f"argmax needs logits [rows, V] with V > 0, got {tuple(x.shape)}")
    if x.stride(1) != 1:
        x = x.contiguous()
    b, v = x.shape
    chunks = min(MAX_CHUNKS, triton.next_power_of_2(triton.cdiv(v, BLOCK)))
    chunk = triton.cdiv(triton.cdiv(v, chunks), BLOCK) * BLOCK
    part = scratch_buffer(x.device, 2 * b * chunks, "argmax")
    cnt = scratch_buffer(x.device, b + 1, "argmax_count")
    hist, step, pos = advance or (tokens, tokens, tokens)
    _argmax_kernel[(b, chunks)](
        x, x.stride(0), v, chunk, part, part[b * chunks :], cnt, tokens,
        hist, hist.stride(0) if advance else 0, step, pos, b,
        BLOCK=BLOCK, CHUNKS=chunks, ADVANCE=advance is not None, num_warps=4, **launch_kwargs(pdl_launch(x)),
    )  # fmt: skip
    return tokens


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """x [B, V] (float) -> int64 [B]: torch.argmax(x, dim=-1), without a host synchronization."""
    return _launch(x, torch.empty(x.shape[0], dtype=torch.long, device=x.device), None)


def greedy_advance(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    history: torch.Tensor,
    step_index: torch.Tensor,
    positions: torch.Tensor,
) -> None:
    """One greedy decode step's bookkeeping after logits [B, V]: tokens [B] (int64) = argmax, written into
    history [B, L] at column step_index [1] (int64); positions [B] (int32) += 1; then step_index += 1."""
    b = logits.shape[0]
    if tokens.shape != (b,) or positions.shape != (b,) or history.shape[0] != b or step_index.numel() != 1:
        raise ValueError("tokens, positions and history need one entry per row of logits, step_index one")
    if history.stride(1) != 1:
        raise ValueError("history must have contiguous rows")
    _launch(logits, tokens, (history, step_index, positions))

"""Pieces shared by the Triton kernels: exact rounding, launch options, split-K workspaces."""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def on_gpu(t: torch.Tensor) -> bool:
    """Native code paths (inline PTX, libdevice) only where a real GPU runs the kernel."""
    return t.is_cuda and not interpreting()


# Float work must round exactly as torch does (a product rounded before a sum), so no fused multiply-adds.
LAUNCH_OPTS = {"enable_fp_fusion": False}

# Programmatic dependent launch (compute capability 9.0 on): a kernel launched with it may start while the
# previous kernel of the stream still runs. It first issues the loads nothing else writes (weights), then
# passes `pdl_gate`: it waits for the previous kernel's results and lets the next kernel start, so a decode
# step's ~150 launches overlap their start-up and first weight reads with the kernel before. Every kernel
# launched this way must pass the gate before it reads activations, caches or scratch buffers, or writes
# anything. Module switch: the benchmarks time the engine with it off too.
PDL = True


@functools.cache
def _pdl_device(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


@functools.cache
def multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def pdl_launch(t: torch.Tensor) -> bool:
    """Whether kernels on `t`'s device launch with programmatic dependent launch."""
    return PDL and on_gpu(t) and _pdl_device(t.device.index if t.device.index is not None else 0)


def launch_kwargs(pdl: bool) -> dict:
    """A kernel's PDL argument (for `pdl_gate`) and launch options, with or without dependent launch."""
    return {"PDL": pdl, **LAUNCH_OPTS, "launch_pdl": True} if pdl else {"PDL": False, **LAUNCH_OPTS}


class Probe:
    """Where a kernel's programs spend their time (benchmarks/gpu_gemv_probe.py): with `buffer` set to an
    int64 tensor [launches, programs, len(points)], each launch takes the next row (rows in launch order, so a
    captured decode step's launches get consecutive ones) and each program writes a timestamp at each of
    `points` into its line of it (see `probe_stamp`)."""

    def __init__(self, points: tuple[str, ...]) -> None:
        self.points = points
        self.buffer: torch.Tensor | None = None
        self._next = 0

    def row(self, t: torch.Tensor) -> torch.Tensor | None:
        """This launch's row, or None when not probing (or not on a GPU: the stamps are inline PTX)."""
        if self.buffer is None or not on_gpu(t):
            return None
        row = self.buffer[self._next % self.buffer.shape[0]]
        self._next += 1
        return row


@triton.jit
def probe_stamp(stamps, point: tl.constexpr, dep, PROBE: tl.constexpr, GLOBAL_AT: tl.constexpr = -1):
    """With PROBE: the multiprocessor's cycle counter into stamps[point] once the scalar `dep` is computed,
    and with GLOBAL_AT >= 0 the GPU's global timer (ns) into stamps[GLOBAL_AT]."""
    if PROBE:
        d = tl.zeros((1,), tl.int32) + dep.to(tl.int32)
        one = tl.arange(0, 1)
        clk = tl.inline_asm_elementwise("mov.u64 $0, %clock64;", "=l,r", [d], dtype=tl.int64, is_pure=False,
                                        pack=1)  # fmt: skip
        tl.store(stamps + point + one, clk)
        if GLOBAL_AT >= 0:
            ns = tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,r", [d], dtype=tl.int64,
                                           is_pure=False, pack=1)  # fmt: skip
            tl.store(stamps + GLOBAL_AT + one, ns)


@triton.jit
def pdl_gate(ON: tl.constexpr):
    """Wait until the previous kernel of the stream has finished and its writes are visible, then let the
    next kernel launch (it passes its own gate before it reads this one's results). See PDL."""
    if ON:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def grid_barrier(bar_ptr, target):
    """Arrive at a barrier of all the launch's programs; wait until the counter at bar_ptr reaches `target`.
    The release orders the program's stores (every thread's, after the block barrier) before its arrival; the
    acquire makes the other programs' stores visible to what follows. All programs must be resident (a
    cooperative launch): a waiting program never yields its multiprocessor."""
    tl.debug_barrier()
    tl.atomic_add(bar_ptr, 1, sem="release")
    seen = tl.atomic_add(bar_ptr, 0, sem="acquire")
    while seen < target:
        seen = tl.atomic_add(bar_ptr, 0, sem="acquire")
    tl.debug_barrier()


# Arrival counters that are never reset: every launch adds exactly ROUND to a counter (each of its P programs
# ROUND // P, P a power of two), so a launch's arrivals start at a multiple of ROUND whatever ran before, its
# last arrival brings the low bits back to zero, and wrapping around past 2**31 changes neither (only the low
# bits are read). Launches of different sizes can share a counter.
ROUND = tl.constexpr(1024)


@triton.jit
def arrive(cnt_ptr, STEP: tl.constexpr):
    """Count this program's arrival (STEP = ROUND // programs) after every thread's stores (released to the
    GPU); returns (the counter before, whether this was the launch's last arrival)."""
    tl.debug_barrier()
    before = tl.atomic_add(cnt_ptr, STEP)
    return before, (before & (ROUND - 1)) == ROUND - STEP


@triton.jit
def wait_arrivals(cnt_ptr, before, STEP: tl.constexpr):
    """After `arrive`: wait until all the launch's programs have arrived, their stores visible (acquire). All
    of them must be resident: a waiting program never yields its multiprocessor."""
    seen = before + STEP
    while (seen & (ROUND - 1)) != 0:
        seen = tl.atomic_add(cnt_ptr, 0, sem="acquire")
    tl.debug_barrier()


@triton.jit
def dependency_wait(PDL: tl.constexpr, BAR: tl.constexpr, bar_ptr, bar_target):
    """Where a program's inputs from before become readable: with BAR, a grid barrier (the previous phase of a
    persistent launch, see decode_layer.py); else, with PDL, the previous kernel's end."""
    if BAR:
        grid_barrier(bar_ptr, bar_target)
    else:
        pdl_gate(PDL)


@triton.jit
def round_half_even(v, NATIVE: tl.constexpr):
    """torch.round on float32 (ties to even). The add-subtract of 1.5 * 2**23 rounds the same way in IEEE
    arithmetic for |v| < 2**22; the interpreter has no libdevice."""
    return libdevice.rint(v) if NATIVE else (v + 12582912.0) - 12582912.0


@triton.jit
def round_to(x, DT: tl.constexpr, NATIVE: tl.constexpr):
    """float32 x rounded to dtype DT (to nearest, ties to even) and returned as float32, as a torch cast.
    The interpreter's own float32 -> bfloat16 cast truncates, so it gets the integer form of the rounding."""
    if DT == tl.float32:  # noqa: SIM300 (DT is a compile-time argument, not a constant)
        r = x
    elif NATIVE or DT != tl.bfloat16:  # noqa: SIM300
        r = x.to(DT).to(tl.float32)
    else:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        r = bits.to(tl.float32, bitcast=True)
    return r


@triton.jit
def quantize_i8(y, a, NATIVE: tl.constexpr):
    """clamp(round(y * a), -128, 127) as int8, as quant.activations.quantize_activations."""
    q = round_half_even(y * a, NATIVE)
    return tl.minimum(tl.maximum(q, -128.0), 127.0).to(tl.int8)


@triton.jit
def absmax_scale(amax):
    """a = 127 / max(amax, 1e-5) as torch evaluates `127 / tensor`: a rounded reciprocal, then a rounded
    product."""
    return tl.math.div_rn(tl.zeros_like(amax) + 1.0, tl.maximum(amax, 1e-5)) * 127.0


_SCRATCH: dict[tuple[torch.device, str], torch.Tensor] = {}
# buffers replaced by larger ones stay allocated: a CUDA graph captured earlier still reads their address
_RETIRED: list[torch.Tensor] = []


def scratch_buffer(device: torch.device, numel: int, kind: str) -> torch.Tensor:
    """A zero-initialized int32 buffer of at least `numel` values per (device, kind), allocated once.

    "acc" / "count": split-K kernels store partial sums in it and count arrivals per output tile; the last
    program of a tile adds the partials up and zeroes the tile's counter again, so the counters are zero
    between launches and a launch needs no memset (it can live in a CUDA graph). "row": the quantized
    activation row of a fused GEMV.
    "attn" / "attn_count": split decode attention's partial results and arrivals; "then_quant_count": the
    arrivals of a GEMV that quantizes its own output row; "codes": ternary weights expanded to int8 for the
    large-M products. Kernels on one device share these buffers: launch them on one stream.
    """
    key = (torch.device(device), kind)
    buf = _SCRATCH.get(key)
    if buf is None or buf.numel() < numel:
        if buf is not None:
            _RETIRED.append(buf)
        buf = torch.zeros(max(numel, 1024), dtype=torch.int32, device=device)
        _SCRATCH[key] = buf
    return buf


RELU2 = 1
SILU = 2
ACTIVATIONS = {"relu2": RELU2, "silu": SILU}


@triton.jit
def gated_activation(g, u, ACT: tl.constexpr, ODT: tl.constexpr, NATIVE: tl.constexpr):
    """act(g) * u as the model computes it in dtype ODT (g, u and the result: float32 holding ODT values):
    relu(g)² or silu(g) rounded to ODT, then the product rounded to ODT."""
    if ACT == 1:
        r = tl.maximum(g, 0.0)
        h = round_to(r * r, ODT, NATIVE)
    else:
        h = round_to(g / (1.0 + tl.exp(-g)), ODT, NATIVE)
    return round_to(h * u, ODT, NATIVE)

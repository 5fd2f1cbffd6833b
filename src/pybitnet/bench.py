"""Throughput benchmark in the manner of llama-bench: prompt processing (ppN) and token generation (tgN).

The model is driven directly through forward(input_ids, positions, cache): ppN runs one forward over N
tokens from position 0 (logits of the last position only, as llama-bench); tgN decodes N tokens one at a time
from position 0, greedily. Each test makes one KV cache of N positions and reuses it for every run, as
llama-bench reuses its context (a token never reads entries past its position, so no clearing is needed), so
the allocator's reuse of freed caches never shows in the figures. Each test runs once untimed (warm-up), then
`reps` times; t/s = tokens / seconds.
Peak RSS is the high-water mark of the timed runs (reset after loading where the OS allows it); runtime RSS is
what the process held before the model was made (interpreter, torch, pybitnet), which the peak includes.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
import statistics
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .formats.memory import streamed_empty
from .kernels import cpu
from .kernels.cpu_head import Int8Head
from .models.kv_cache import KVCache
from .nn import PackedBitLinear


@dataclass
class BenchResult:
    model: str
    size_bytes: int
    params: int
    backend: str
    threads: int
    test: str
    ts_mean: float
    ts_sd: float
    samples: list[float]
    peak_rss_bytes: int
    runtime_rss_bytes: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def weight_bytes_and_params(model: nn.Module) -> tuple[int, int]:
    """Bytes of every weight as the model holds it for inference (packed ternary, int8 head when in use, float
    tensors otherwise, shared tensors once) and the parameter count of the architecture."""
    seen: set[int] = set()
    size = params = 0
    head = getattr(model, "lm_head_int8", None)
    for module in model.modules():
        if isinstance(module, PackedBitLinear):
            size += module.packed.numel() * module.packed.element_size() + module.scale.numel() * 4
            params += module.in_features * module.out_features
            continue
        if isinstance(module, Int8Head):
            size += module.q.numel() + module.scale.numel() * 4
            continue
        for p in module.parameters(recurse=False):
            key = p.data_ptr()
            if key in seen:
                continue
            seen.add(key)
            params += p.numel()
            is_float_head = head is not None and module is getattr(model, "lm_head", None)
            if not is_float_head:
                size += p.numel() * p.element_size()
    return size, params


def _reset_peak_rss() -> bool:
    """Return freed heap to the OS (load-time temporaries that glibc keeps mapped), then restart the
    high-water mark, so the peak counts what the timed runs hold."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _proc_status_bytes(field: str) -> int | None:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in bytes; None where /proc is missing."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def current_rss_bytes() -> int:
    """Resident bytes now (0 where /proc is missing)."""
    return _proc_status_bytes("VmRSS") or 0


def peak_rss_bytes() -> int:
    peak = _proc_status_bytes("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _prompt(model: nn.Module, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (1, n), generator=g)


def run_pp(model: nn.Module, n: int, cache: KVCache | None = None) -> float:
    """Seconds of one forward over n prompt tokens, into `cache` (at least n positions; a new one if None)."""
    ids = _prompt(model, n)
    cache = model.new_cache(1, n) if cache is None else cache
    t = time.perf_counter()
    model(ids, torch.arange(n)[None], cache, last_only=True)
    return time.perf_counter() - t


def run_tg(model: nn.Module, n: int, cache: KVCache | None = None) -> float:
    """Seconds of n greedy one-token steps, into `cache` (at least n positions; a new one if None)."""
    cache = model.new_cache(1, n) if cache is None else cache
    token = _prompt(model, 1)
    t = time.perf_counter()
    for pos in range(n):
        logits = model(token, torch.tensor([[pos]]), cache, last_only=True)
        token = cpu.argmax(logits[:, -1])[:, None]
    return time.perf_counter() - t


def bench(
    model: nn.Module,
    name: str,
    backend: str,
    threads: int,
    tests: list[tuple[str, int]],
    reps: int,
    runtime_rss: int = 0,
) -> list[BenchResult]:
    """Run each (kind, n) test, kind "pp" or "tg", with the kernels and torch set to `threads` threads.
    `runtime_rss`: current_rss_bytes() before the model was made, reported with the results."""
    if cpu.native_available():
        cpu.set_num_threads(threads)
    results = []
    with torch.inference_mode():
        for kind, n in tests:
            run = run_pp if kind == "pp" else run_tg
            # Decode's torch ops are too small to split; torch's idle OpenMP workers would only spin on the
            # cores the kernels' threads need. Prefill's attention is large enough to use them.
            torch.set_num_threads(threads if kind == "pp" else 1)
            cache = model.new_cache(1, n)
            run(model, n, cache)  # warm-up (also builds the int8 head on first use)
            _reset_peak_rss()
            seconds = [run(model, n, cache) for _ in range(reps)]
            del cache
            rates = [n / s for s in seconds]
            size, params = weight_bytes_and_params(model)
            results.append(
                BenchResult(
                    model=name,
                    size_bytes=size,
                    params=params,
                    backend=backend,
                    threads=threads,
                    test=f"{kind}{n}",
                    ts_mean=statistics.fmean(rates),
                    ts_sd=statistics.stdev(rates) if len(rates) > 1 else 0.0,
                    samples=rates,
                    peak_rss_bytes=peak_rss_bytes(),
                    runtime_rss_bytes=runtime_rss,
                )
            )
    return results


def read_bandwidth(threads: int, nbytes: int = 1 << 30) -> float:
    """The machine's read bandwidth in GB/s with `threads` threads of the C kernels: the best of a read loop
    (with and without software prefetch) over nbytes of ordinary memory and of the huge-page memory the
    weights live in (`streamed_empty`). Decode's bandwidth efficiency divides by it, so the larger is kept."""
    cpu.set_num_threads(threads)
    best = 0.0
    for make in (torch.empty, streamed_empty):
        buf = make((nbytes,), dtype=torch.uint8).fill_(1)
        best = max(best, cpu._native.read_bandwidth(buf.data_ptr(), buf.numel(), 5)[0])
        del buf
    return best


def backend_name(model: nn.Module) -> str:
    layer = next((m for m in model.modules() if isinstance(m, PackedBitLinear)), None)
    kernel = "none" if layer is None else layer.kernel.name
    if kernel == "cpu":
        kernel = f"cpu ({cpu.best_isa()})"
    head = model.int8_head() if hasattr(model, "int8_head") else None
    return f"{kernel}, {f'int{head.bits}' if head is not None else 'float'} head"


def default_threads() -> int:
    env = os.environ.get(cpu.THREADS_ENV)
    return int(env) if env else cpu.physical_cores()

"""Is the CPU decode GEMV bound by memory or by compute? Its rate on a weight that stays in the last-level
cache against one streamed from DRAM, and the machine's read bandwidth, at 1 and 2 threads.

    python benchmarks/cpu_gemv_ceiling.py [--threads 1,2] [--isa NAME]

If the in-cache rate (the kernel's compute ceiling) is not well above the DRAM read bandwidth, decode cannot
reach that bandwidth: the kernel, not memory, sets the pace.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import torch

from pybitnet.bench import read_bandwidth
from pybitnet.formats.memory import streamed_copy
from pybitnet.kernels import cpu
from pybitnet.quant import TernaryWeight, pack

SHAPES = [(3840, 2560), (2560, 2560), (13824, 2560), (2560, 6912)]  # one 2B-4T layer's projections


def packed(n: int, k: int, g: torch.Generator):
    codes = torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8)
    return pack(TernaryWeight(codes, torch.tensor(0.05)), "cpu_i2")


def last_level_cache_bytes() -> int:
    """The largest cache's size as Linux reports it (0 elsewhere)."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    sizes = [0]
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = f.read_text().strip()
        sizes.append(int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text))
    return max(sizes)


def thread_counts(text: str) -> list[int]:
    try:
        counts = [int(t) for t in text.split(",")]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"expected positive thread counts separated by commas, got {text!r}")
    return counts


def rate(isa: int, mats: list, xs: dict, calls: int) -> float:
    """GB/s of weights read by `calls` passes over the matrices (best of three)."""
    nbytes = sum(w.data.numel() for w in mats)
    best = 0.0
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(calls):
            for w in mats:
                cpu.linear(isa, xs[w.shape[1]], w)
        best = max(best, calls * nbytes / (time.perf_counter() - t) / 1e9)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=thread_counts, default="1,2", help="thread counts, e.g. 1,2")
    ap.add_argument("--isa", choices=sorted(cpu.ISAS), help="the kernel's instruction set; default: the best")
    args = ap.parse_args()
    isa_name = args.isa or cpu.best_isa()
    if not cpu.isa_available(isa_name):
        ap.error(f"--isa {isa_name}: this CPU or build cannot run it (best here: {cpu.best_isa()})")
    isa = cpu.ISAS[isa_name]
    g = torch.Generator().manual_seed(0)
    cached = [packed(6144, 2560, g)]  # 3.9 MB: inside the last-level cache (or two cores' L2)
    # copies of one layer's matrices, at least 3x the last-level cache (a 300 MB L3 holds several layers)
    layer = [packed(n, k, g) for n, k in SHAPES]
    copies = max(6, -(-3 * last_level_cache_bytes() // sum(w.data.numel() for w in layer)))
    streamed = [dataclasses.replace(w, data=streamed_copy(w.data)) for _ in range(copies) for w in layer]
    xs = {k: torch.randn(1, k, generator=g) for k in (2560, 6912)}
    print(f"kernel {isa_name}")
    for threads in args.threads:
        cpu.set_num_threads(threads)
        rate(isa, cached, xs, 20)  # warm-up: thread pool, caches
        in_cache = rate(isa, cached, xs, 200)
        from_dram = rate(isa, streamed, xs, 2)
        bandwidth = read_bandwidth(threads)
        print(
            f"{threads} thread(s): GEMV from cache {in_cache:.1f} GB/s, from DRAM {from_dram:.1f} GB/s; "
            f"read bandwidth {bandwidth:.1f} GB/s; DRAM GEMV = {from_dram / bandwidth:.0%} of bandwidth, "
            f"compute ceiling = {in_cache / bandwidth:.0%} of it"
        )


if __name__ == "__main__":
    main()

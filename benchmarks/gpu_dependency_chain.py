"""What one link of a chain of dependent kernels costs on the GPU: each kernel reads the previous one's output
row and writes its own (like the ~150 launches of a batch-1 decode step), captured in a CUDA graph, timed
with CUDA events. Three ways for a kernel to wait for its input:

- "stream": plain launches, each starts when the previous one has ended;
- "pdl": programmatic dependent launch as the engine's kernels use it (`common.pdl_gate`: wait for the
  previous grid to complete and flush, then let the next one launch);
- "flag": launched as "pdl", but instead of waiting for the previous grid's completion a program polls a
  counter the previous kernel's programs raise (release) after their stores, then lets the next one launch:
  the wait ends at the last producer's store, not at its grid's teardown.

    PYTHONPATH=src python benchmarks/gpu_dependency_chain.py [--links 100] [--programs 132,396] [--row 2048]
        [--weight-words 0,4096,16384]

With --weight-words each program also reads its own weights, requested before the wait (as the engine's
GEMVs request theirs), so a link shows how much of streaming them the overlap with the kernel before hides.
"""

from __future__ import annotations

import argparse
import types

import torch
import triton
import triton.language as tl
from gpu_bench import replay_ms, write_json  # this script's folder is on the path when it runs

from pybitnet.kernels.triton.common import pdl_gate

MODES = {"stream": 0, "pdl": 1, "flag": 2}


@triton.jit
def _link(
    src, dst, w_ptr, counters, epoch_ptr, idx,
    ROW: tl.constexpr, WORDS: tl.constexpr, MODE: tl.constexpr, SIGNAL: tl.constexpr,
):  # fmt: skip
    """Program p: dst[p * ROW + i] = (sum of the row another program of the previous kernel wrote) + i (+ the
    sum of its WORDS weight words, requested before the wait as the engine's GEMVs do)."""
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    if WORDS:
        w = tl.load(w_ptr + pid.to(tl.int64) * WORDS + tl.arange(0, WORDS))
    if MODE == 1:
        pdl_gate(True)
    elif MODE == 2:
        target = (tl.load(epoch_ptr) + 1) * n_prog  # the previous link's programs arrive once a replay
        seen = tl.atomic_add(counters + idx - 1, 0, sem="acquire")
        while seen < target:
            seen = tl.atomic_add(counters + idx - 1, 0, sem="acquire")
        tl.debug_barrier()
        tl.extra.cuda.gdc_launch_dependents()
    cols = tl.arange(0, ROW)
    total = tl.sum(tl.load(src + ((pid + 1) % n_prog) * ROW + cols), axis=0)
    if WORDS:
        total += tl.sum((w & 255).to(tl.float32), axis=0)
    tl.store(dst + pid * ROW + cols, total * 1e-6 + cols.to(tl.float32))
    if SIGNAL:
        tl.debug_barrier()
        tl.atomic_add(counters + idx, 1, sem="release")


@triton.jit
def _next_epoch(epoch_ptr):
    tl.store(epoch_ptr, tl.load(epoch_ptr) + 1)


def chain_us(
    mode: str, links: int, programs: int, row: int, warps: int, words: int = 0, replays: int = 50
) -> float:
    bufs = [torch.zeros(programs * row, device="cuda") for _ in range(2)]
    # each link its own weights (all links together far past the L2), as each projection of a decode step
    weights = [torch.ones(programs * max(words, 1), dtype=torch.int32, device="cuda") for _ in range(links)]
    counters = torch.zeros(links + 1, dtype=torch.int64, device="cuda")
    epoch = torch.zeros(1, dtype=torch.int64, device="cuda")

    def step() -> None:
        for i in range(links):
            m = MODES[mode] if i else 0  # the first link follows the previous replay: a plain launch
            opts = {"launch_pdl": True} if m else {}
            src, dst = bufs[i % 2], bufs[(i + 1) % 2]
            sig = mode == "flag"
            _link[(programs,)](
                src, dst, weights[i], counters, epoch, i,
                ROW=row, WORDS=words, MODE=m, SIGNAL=sig, num_warps=warps, **opts,
            )  # fmt: skip
        if mode == "flag":
            _next_epoch[(1,)](epoch)

    step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    graph.replay()
    return replay_ms(types.SimpleNamespace(run=graph.replay, steps=1), replays) * 1e3 / links


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--links", type=int, default=100)
    ap.add_argument("--programs", default="132,396", help="programs a kernel (comma-separated)")
    ap.add_argument("--row", type=int, default=2048, help="floats each program reads (a power of two)")
    ap.add_argument("--warps", type=int, default=4)
    ap.add_argument(
        "--weight-words",
        default="0",
        help="int32 weight words a program reads, requested before its wait "
        "(comma-separated powers of two; 0: none). 132 programs x 16384 words = 8.6 MB, gate/up's 2-bit size",
    )
    ap.add_argument("--out")
    args = ap.parse_args()
    results = {
        "device": torch.cuda.get_device_name(),
        "links": args.links,
        "row": args.row,
        "us_per_link": {},
    }
    for words in (int(w) for w in args.weight_words.split(",")):
        for programs in (int(p) for p in args.programs.split(",")):
            for mode in MODES:
                us = min(chain_us(mode, args.links, programs, args.row, args.warps, words) for _ in range(3))
                results["us_per_link"][f"{mode} {programs} {words}"] = us
                mb = programs * words * 4 / 1e6
                print(f"{mode:6s} {programs:4d} programs, {mb:5.2f} MB of weights: {us:.2f} us a link")
    write_json(results, args.out)


if __name__ == "__main__":
    main()

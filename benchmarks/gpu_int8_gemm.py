"""The int8 GEMM of BitLinear training (`pybitnet.train.int8_gemm`) against cuBLAS at the training shapes.

    PYTHONPATH=src python benchmarks/gpu_int8_gemm.py [--rows 8192] [--out int8_gemm.json]

For each product of a 2B-4T block at `--rows` tokens (forward: activations x weights; backward, grad_x in
"int8" mode: output gradients x transposed codes), every tile configuration of the kernel is checked for
integer exactness against torch._int_mm and timed (triton.testing.do_bench, which clears the L2 between
runs), next to cuBLAS bf16 (torch.matmul) and cuBLASLt int8 (torch._int_mm) on the same shapes. Prints the
rate of each and the fastest configuration per shape; the autotune list in int8_gemm.py should hold the
winners.
"""

from __future__ import annotations

import argparse
import json

import torch
import triton

from pybitnet.train import int8_gemm

SHAPES = {  # product: (N, K) with M = rows; 2B-4T: hidden 2560, KV 640, intermediate 6912, q/k/v and
    # gate/up each one stacked product
    "fwd o": (2560, 2560),
    "fwd q/k/v": (3840, 2560),
    "fwd gate/up": (13824, 2560),
    "fwd down": (2560, 6912),
    "grad_x o": (2560, 2560),
    "grad_x q/k/v": (2560, 3840),
    "grad_x gate/up": (2560, 13824),
    "grad_x down": (6912, 2560),
}
# (BLOCK_M, BLOCK_N, BLOCK_K, stages, warps). Triton 3.6's warp-specialized loop (tl.range(...,
# warp_specialize=True)) fails to compile this kernel for sm_90, so it is not among them.
CONFIGS = [
    (128, 128, 128, 3, 4), (128, 128, 128, 4, 8), (128, 256, 128, 3, 8), (256, 128, 128, 3, 8),
    (128, 64, 128, 4, 4), (64, 128, 256, 3, 4), (128, 256, 64, 4, 8), (128, 256, 128, 4, 8),
    (256, 128, 128, 4, 8), (128, 128, 128, 5, 4), (128, 128, 256, 3, 8), (256, 256, 64, 3, 8),
]  # fmt: skip


def tops(m: int, n: int, k: int, ms: float) -> float:
    return 2 * m * n * k / (ms * 1e-3) / 1e12


def bench_shape(m: int, n: int, k: int) -> dict:
    a = torch.randint(-127, 128, (m, k), dtype=torch.int8, device="cuda")
    b = torch.randint(-1, 2, (n, k), dtype=torch.int8, device="cuda")
    ra, cs = torch.rand(m, device="cuda") + 0.5, torch.rand(n, device="cuda")
    ref = (torch._int_mm(a, b.t()).float() * (cs[None, :] / ra[:, None])).to(torch.bfloat16)
    ab, bb = a.to(torch.bfloat16), b.to(torch.bfloat16)
    row: dict = {
        "bf16_ms": triton.testing.do_bench(lambda: torch.matmul(ab, bb.t())),
        "int_mm_ms": triton.testing.do_bench(lambda: torch._int_mm(a, b.t())),
        "configs": [],
    }
    kernel = int8_gemm._jitted(False)
    out = torch.empty((m, n), dtype=torch.bfloat16, device="cuda")
    for bm, bn, bk, st, wp in CONFIGS:
        grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)

        def run(bm=bm, bn=bn, bk=bk, st=st, wp=wp, grid=grid):
            kernel[grid](a, b, out, ra, cs, m, n, k, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8,
                         num_stages=st, num_warps=wp)  # fmt: skip

        entry = {"config": [bm, bn, bk, st, wp]}
        try:
            out.zero_()
            run()
            entry["exact"] = bool(torch.equal(out, ref))
            entry["ms"] = triton.testing.do_bench(run) if entry["exact"] else None
        except Exception as e:  # a tile the compiler or the GPU rejects is recorded and skipped
            entry["error"] = repr(e)[:200]
        row["configs"].append(entry)
    timed = [c for c in row["configs"] if c.get("ms")]
    best = min(timed, key=lambda c: c["ms"]) if timed else None
    row["best"] = best
    for key in ("bf16_ms", "int_mm_ms"):
        row[key.replace("_ms", "_tops")] = tops(m, n, k, row[key])
    if best:
        row["best_tops"] = tops(m, n, k, best["ms"])
        row["vs_bf16"] = row["bf16_ms"] / best["ms"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=8192)
    ap.add_argument("--out")
    args = ap.parse_args()
    results: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    results["triton"] = triton.__version__
    for name, (n, k) in SHAPES.items():
        r = results[name] = bench_shape(args.rows, n, k)
        best = r.get("best") or {}
        nan = float("nan")
        print(f"{name:16s} M={args.rows} N={n} K={k}: bf16 {r['bf16_tops']:.0f} TFLOPS, _int_mm "
              f"{r['int_mm_tops']:.0f} TOPS, ours {r.get('best_tops', nan):.0f} TOPS "
              f"({r.get('vs_bf16', nan):.2f}x bf16) with {best.get('config')}", flush=True)  # fmt: skip
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()

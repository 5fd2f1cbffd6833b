"""The one-row GEMV with resident programs (`MMConfig(resident=...)`: each program several output tiles over
all of K, the next tile's weights requested before the current one is multiplied) against the
tile-per-program kernel, on the issue's 2B-4T shapes, int8 row in. Timed as benchmarks/gpu_bench.py times
kernels (100 launches in a CUDA graph, weight copies past L2, median of 7 replays), with and without
programmatic dependent launch; every configuration is checked against the exact integer result first.

    python benchmarks/gpu_gemv_resident.py [--shapes qkv,o,gate_up,down] [--bn 8,16,32,64] \\
        [--resident 1,2,3,4] [--warps 2,4,8] [--fused-norm]

`--fused-norm` times the form the decode step runs: a bfloat16 row in, RMSNorm with a gain and the int8
quantization inside the GEMV (every program normalizes the row), checked equal to the GEMV of the row
normalized and quantized first (`norm_quant`); the int8-in times of the same configurations beside it.
"""

from __future__ import annotations

import argparse
import functools

import torch
from gpu_bench import ISSUE_US, SHAPES, _clone, copies_for, exact_ref, graph_time_us, pdl, random_packed

from pybitnet.kernels.triton.matmul import MMConfig, default_config, ternary_gemv
from pybitnet.kernels.triton.quant import norm_quant
from pybitnet.quant import quantize_activations

GEMV = functools.partial(MMConfig, gemv=True, num_stages=1)


def configs(bns: list[int], residents: list[int], warps: list[int]) -> list[MMConfig]:
    """The tile-per-program default, then resident programs of each shape."""
    return [GEMV(bn=16, bk=2048, num_warps=8)] + [
        GEMV(bn=bn, resident=res, num_warps=nw)
        for bn in bns
        for res in residents
        for nw in warps
        if bn * nw <= 256
    ]


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="qkv,o,gate_up,down")
    ap.add_argument("--bn", type=ints, default=[8, 16, 32, 64], help="rows a tile, e.g. 4,8,16")
    ap.add_argument("--resident", type=ints, default=[1, 2, 3, 4], help="programs a multiprocessor")
    ap.add_argument("--warps", type=ints, default=[2, 4, 8], help="warps a program")
    ap.add_argument("--fused-norm", action="store_true", help="bf16 row in, RMSNorm + quantization fused")
    args = ap.parse_args()
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    g = torch.Generator().manual_seed(0)
    for name in args.shapes.split(","):
        n, k = SHAPES[name]
        xf = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        gain = (torch.rand(k, device="cuda") + 0.5).to(torch.bfloat16)
        if args.fused_norm:
            xq, a, _ = norm_quant(xf, gain)
        else:
            xq, a = quantize_activations(xf)
            a = a[:, 0]
        a = a.contiguous()
        tw, pw0 = random_packed(n, k, False, g)
        copies = [pw0] + [_clone(pw0) for _ in range(copies_for(pw0.data.numel(), l2) - 1)]
        ref = exact_ref(xq, a, tw, torch.bfloat16)
        out = torch.empty(1, n, device="cuda", dtype=torch.bfloat16)
        rows = []
        tried, step = configs(args.bn, args.resident, args.warps), None
        if args.fused_norm:  # and the decode step's own tiles (gate/up's are those of its gated form)
            step = default_config(1, n // 2, k, gated=True) if name == "gate_up" else default_config(1, n, k)
            tried += [step] if step and step not in tried else []
        for cfg in tried:
            ternary_gemv(xq, copies[0], a=a, out=out, config=cfg)
            if not torch.equal(out, ref):
                print(f"{name} {cfg}: NOT EXACT")
                continue
            calls = [functools.partial(ternary_gemv, xq, w, a=a, out=out, config=cfg) for w in copies]
            with_pdl = graph_time_us(calls)
            if args.fused_norm:  # the second time: the row normalized inside; "no PDL" is not timed
                ternary_gemv(xf, copies[0], gain=gain, out=out, config=cfg)
                if not torch.equal(out, ref):
                    print(f"{name} {cfg}: fused norm NOT EQUAL")
                    continue
                fused = functools.partial(ternary_gemv, xf, gain=gain, out=out, config=cfg)
                calls = [functools.partial(fused, w) for w in copies]
                with_pdl, without = graph_time_us(calls), with_pdl
            else:
                with pdl(False):
                    without = graph_time_us(calls)
            rows.append((with_pdl, without, cfg))
        rows.sort(key=lambda r: r[0])
        other = "int8 row in" if args.fused_norm else "no PDL"
        for t, t_no, cfg in rows[:4] + [r for r in rows[4:] if not r[2].resident or r[2] == step]:
            kind = f"resident {cfg.resident}" if cfg.resident else f"tile a program, bk {cfg.bk}"
            kind += " (the decode step's)" if cfg == step else ""
            print(f"{name}: {t:.2f} µs ({other} {t_no:.2f}), {cfg.bn} rows, {kind}, {cfg.num_warps} warps")
        del copies
        # cuBLAS bf16 on the same row, weights past L2 as well
        xb = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        wb = [torch.randn(n, k, device="cuda", dtype=xb.dtype) for _ in range(copies_for(2 * n * k, l2))]
        bf16 = graph_time_us([functools.partial(torch.matmul, xb, w.T, out=out) for w in wb])
        del wb
        if rows:
            best = rows[0][0]
            print(
                f"{name}: cuBLAS bf16 {bf16:.2f} µs (same run); fastest {best:.2f} µs = {bf16 / best:.2f}x "
                f"cuBLAS, {ISSUE_US[name][1] / best:.2f}x Microsoft W2A8 ({ISSUE_US[name][1]} µs, issue)"
            )


if __name__ == "__main__":
    main()

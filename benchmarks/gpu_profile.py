"""Launch each ternary kernel of a 2B-4T decode / prefill step once, with its committed tiles, for Nsight
Compute: where a kernel's time goes (memory throughput, occupancy, stall reasons), not how long it takes.
At one row this includes a whole decoder layer as one persistent launch ("decode_layer_b1").

    ncu --clock-control none --profile-from-start off --section SpeedOfLight --section Occupancy \\
        --section LaunchStats --section WarpStateStats python benchmarks/gpu_profile.py [--rows 1,64,2048]

The kernels are compiled and run once outside the profiled range; inside it each runs once on weights that
are not in L2 (ncu flushes the caches between kernels by default). Activations are random int8.
"""

from __future__ import annotations

import argparse

import torch
from gpu_bench import SHAPES, random_packed  # this script's folder is on the path when it runs

from pybitnet.kernels.triton.attention import decode_attention
from pybitnet.kernels.triton.decode_layer import decode_layer
from pybitnet.kernels.triton.matmul import ternary_gemv, ternary_mm


def launches(rows: list[int]):
    g = torch.Generator().manual_seed(0)
    calls = []
    for name, (n, k) in SHAPES.items():
        if name == "lm_head":
            continue
        act = "relu2" if name == "gate_up" else None
        w = random_packed(n, k, False, g)[1]
        for m in rows:
            xq = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8).cuda()
            a = torch.full((m,), 3.0, device="cuda")
            if m == 1:
                # the plain GEMV (int8 row in), gate_up as two stacked matrices without the gate
                calls.append((f"{name}_m1", lambda xq=xq, a=a, w=w: ternary_gemv(xq, w, a=a)))
                xf = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
                calls.append((f"{name}_m1_fused_norm",
                              lambda xf=xf, w=w, act=act: ternary_gemv(xf, w, act=act)))  # fmt: skip
            else:
                calls.append((f"{name}_m{m}", lambda xq=xq, a=a, w=w, act=act: ternary_mm(xq, a, w, act=act)))
    if 1 in rows or 64 in rows:
        for b in [r for r in rows if r in (1, 64)]:
            qkv = torch.randn(b, 3840, device="cuda", dtype=torch.bfloat16)
            cos = torch.randn(4096, 128, device="cuda", dtype=torch.bfloat16)
            kc = torch.randn(b, 5, 4096, 128, device="cuda", dtype=torch.bfloat16)
            vc = torch.randn_like(kc)
            pos = torch.full((b,), 384, device="cuda", dtype=torch.int32)
            calls.append((f"attention_b{b}",
                          lambda qkv=qkv, cos=cos, kc=kc, vc=vc, pos=pos: decode_attention(
                              qkv, cos, cos, pos, kc, vc, 20, 5)))  # fmt: skip
    if 1 in rows:  # one decoder layer as one persistent launch (decode_layer.py)
        calls.append(("decode_layer_b1", one_layer(g)))
    return calls


def one_layer(g: torch.Generator):
    """A call running a random 2B-4T layer through `decode_layer` at batch 1, context 384."""
    hid, inter = 2560, 6912
    weights = [
        random_packed(n, k, True, g)[1] for n, k in ((3840, hid), (hid, hid), (2 * inter, hid), (hid, inter))
    ]
    gains = [
        (1 + 0.1 * torch.randn(k, generator=g)).to(torch.bfloat16).cuda() for k in (hid, hid, hid, inter)
    ]
    stacked = (gains[0], weights[0], gains[1], weights[1], gains[2], weights[2], gains[3], weights[3])
    x = torch.randn(1, hid, device="cuda", dtype=torch.bfloat16)
    cos = torch.randn(4096, 128, device="cuda", dtype=torch.bfloat16)
    kc = torch.randn(1, 5, 4096, 128, device="cuda", dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    pos = torch.full((1,), 384, device="cuda", dtype=torch.int32)
    barrier = torch.zeros(1, dtype=torch.int64, device="cuda")
    return lambda: decode_layer(x, stacked, cos, cos, pos, kc, vc, 20, 5, 1e-5, "relu2", barrier)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="1,64,2048", help="comma-separated row counts")
    args = p.parse_args()
    calls = launches([int(r) for r in args.rows.split(",")])
    for _, fn in calls:  # compile outside the profiled range
        fn()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    for name, fn in calls:
        torch.cuda.nvtx.range_push(name)
        fn()
        torch.cuda.nvtx.range_pop()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()
    print("profiled:", ", ".join(name for name, _ in calls))


if __name__ == "__main__":
    main()

"""The one-launch decoder layer (kernels/triton/decode_layer.py) at batch 1: what one grid barrier costs, and
the engine's decode rate with each layer as one launch (by programs and register cap) against the five
launches a layer, on the 2B-4T shape.

    PYTHONPATH=src python benchmarks/gpu_layer_kernel.py [--out layer_kernel.json] [--steps 256]

A barrier's cost: a cooperative launch of one program per multiprocessor passing 1 or 101 barriers, the
difference over 100; with the counter polled by read-modify-writes (common.grid_barrier) or by acquire loads.
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import torch
import triton
import triton.language as tl
from gpu_bench import _decode_rate  # this script's folder is on the path when it runs

from pybitnet.engine import cuda_graph
from pybitnet.kernels.triton.common import grid_barrier
from pybitnet.kernels.triton.decode_layer import decode_layer


@triton.jit
def _load_acquire(ptr):
    return tl.inline_asm_elementwise(
        "ld.acquire.gpu.global.b64 $0, [$1];", "=l,l", [ptr], dtype=tl.int64, is_pure=False, pack=1
    )


@triton.jit
def _barrier_load_poll(bar_ptr, target):
    """grid_barrier polling with acquire loads instead of atomic adds of 0 (measured slower on an H200)"""
    tl.debug_barrier()
    tl.atomic_add(bar_ptr, 1, sem="release")
    seen = _load_acquire(bar_ptr)
    while seen < target:
        seen = _load_acquire(bar_ptr)
    tl.debug_barrier()


@triton.jit
def _barriers_kernel(bar_ptr, N: tl.constexpr, LOAD_POLL: tl.constexpr):
    n_prog = tl.num_programs(0).to(tl.int64)
    quota = n_prog * N
    base = tl.atomic_add(bar_ptr, 0, sem="acquire") // quota * quota
    for i in tl.static_range(N):
        if LOAD_POLL:
            _barrier_load_poll(bar_ptr, base + (i + 1) * n_prog)
        else:
            grid_barrier(bar_ptr, base + (i + 1) * n_prog)


def barrier_us(programs: int, load_poll: bool, warps: int = 8) -> float:
    def run(n: int, bar: torch.Tensor) -> float:
        opts = {"num_warps": warps, "launch_cooperative_grid": True}
        launch = functools.partial(_barriers_kernel[(programs,)], bar, N=n, LOAD_POLL=load_poll, **opts)
        launch()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            launch()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) * 1000 / 20

    one, many = (run(n, torch.zeros(1, dtype=torch.int64, device="cuda")) for n in (1, 101))
    return (many - one) / 100


def decode_rates(steps: int, sms: int) -> dict:
    from pybitnet.engine.cuda_graph import CudaGraphEngine
    from pybitnet.models.presets import preset
    from pybitnet.models.random_init import random_model

    model = random_model(preset("bitnet-2b-4t"), seed=0, dtype=torch.bfloat16, kernel="reference").cuda()
    prompts = torch.randint(0, 128000, (1, 128), generator=torch.Generator().manual_seed(0)).tolist()
    variants = {  # name: (layer_kernel, decode_layer options)
        "five_launches": (False, {}),
        "layer_1_per_sm": (True, {}),
        # the wait before every phase's first work item: half the code (instruction-cache misses)
        "layer_1_per_sm_no_overlap": (True, {"overlap": False}),
        "layer_2_per_sm_128_regs": (True, {"programs": 2 * sms, "maxnreg": 128}),
        "layer_half_sms": (True, {"programs": sms // 2}),
    }
    out = {}
    for name, (layer_kernel, opts) in variants.items():
        cuda_graph.decode_layer = functools.partial(decode_layer, **opts)
        try:
            t = time.perf_counter()
            eng = CudaGraphEngine(model, max_batch_size=1, max_len=128 + steps + 8, layer_kernel=layer_kernel)
            eng.generate(prompts, 4)
            tok_s, ms = _decode_rate(eng, prompts, steps)
            out[name] = {"tok_s": tok_s, "step_ms": ms, "setup_s": time.perf_counter() - t}
            del eng
        except Exception as e:  # recorded; the other variants still run
            out[name] = {"error": repr(e)[-600:]}
        finally:
            cuda_graph.decode_layer = decode_layer
            torch.cuda.empty_cache()
        print(name, out[name], flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="layer_kernel.json")
    ap.add_argument("--steps", type=int, default=256)
    args = ap.parse_args()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    results = {"device": torch.cuda.get_device_name(0), "multiprocessors": sms}
    for load_poll in (False, True):
        key = f"barrier_us_{'load' if load_poll else 'rmw'}_poll"
        try:
            results[key] = barrier_us(sms, load_poll)
        except Exception as e:  # recorded; the decode rates still run
            results[key] = repr(e)[-300:]
        print(f"{key}: {results[key]}", flush=True)
    results["decode_b1"] = decode_rates(args.steps, sms)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()

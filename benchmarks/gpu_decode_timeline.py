"""Where a batch-1 decode step's time goes on the GPU: the kernels of one replayed step (2B-4T shape, random
weights, the default engine), each kernel's mean duration and the idle time between consecutive kernels, from
the PyTorch profiler (CUPTI) over a few graph replays; then the step's tok/s with other split-attention
launch shapes, to check the engine's DECODE_CONFIGS in place.

    python benchmarks/gpu_decode_timeline.py [--context 384] [--replays 20] [--out timeline.json]

Kernel times here are the GPU's own (start to end of each kernel in the replay); with programmatic dependent
launch consecutive kernels overlap, so a negative gap means the next kernel started before this one ended.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import statistics

import torch

from pybitnet.engine.cuda_graph import CudaGraphEngine
from pybitnet.kernels.triton import attention as att
from pybitnet.models.presets import preset
from pybitnet.models.random_init import random_model


@torch.inference_mode()
def _decode_loop(eng: CudaGraphEngine, context: int):
    """A captured batch-1 decode loop positioned after a `context`-token prompt."""
    prompt = torch.randint(0, 128000, (1, context)).tolist()
    eng.generate(prompt, 4)  # captures the graph, compiles everything
    loop = eng._loop(1, False)
    logits = eng.prefill(prompt)
    loop.tokens.copy_(logits.argmax(-1))
    loop.positions.fill_(context)
    loop.step_index.fill_(1)
    loop.run()
    torch.cuda.synchronize()
    return loop


@torch.inference_mode()
def step_ms(loop, steps: int = 100) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(5):
        loop.run()
    start.record()
    for _ in range(steps):
        loop.run()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / steps


@torch.inference_mode()
def timeline(loop, replays: int) -> dict:
    """Per kernel name: launches per step, mean µs; and the step's summed kernel time and gaps."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            loop.run()
        torch.cuda.synchronize()
    events = sorted(
        (e for e in prof.events() if e.device_type.name == "CUDA" and e.time_range.elapsed_us() > 0),
        key=lambda e: e.time_range.start,
    )
    by_name = collections.defaultdict(list)
    gaps = collections.defaultdict(list)
    for prev, e in itertools.pairwise(events):
        gaps[prev.name[:60]].append(e.time_range.start - prev.time_range.end)
    for e in events:
        by_name[e.name[:60]].append(e.time_range.elapsed_us())
    rows = {
        name: {
            "per_step": len(t) / replays,
            "mean_us": statistics.mean(t),
            "gap_after_us": statistics.median(gaps[name]) if gaps[name] else None,
        }
        for name, t in by_name.items()
    }
    busy = sum(sum(t) for t in by_name.values()) / replays
    span = (events[-1].time_range.end - events[0].time_range.start) / replays if events else 0.0
    return {"kernels": rows, "kernel_us_per_step": busy, "span_us_per_step": span, "events": len(events)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=384)
    ap.add_argument("--replays", type=int, default=20)
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = random_model(preset("bitnet-2b-4t"), seed=0, dtype=torch.bfloat16, kernel="reference").cuda()
    results: dict = {"context": args.context}
    eng = CudaGraphEngine(model, max_batch_size=1, max_len=args.context + 64)
    loop = _decode_loop(eng, args.context)
    results["default_step_ms"] = step_ms(loop)
    print(f"default engine: {results['default_step_ms'] * 1e3:.1f} µs a step")
    try:
        results["timeline"] = tl = timeline(loop, args.replays)
        print(f"{tl['events']} kernel events; kernels {tl['kernel_us_per_step']:.1f} µs of a "
              f"{tl['span_us_per_step']:.1f} µs span a step")  # fmt: skip
        for name, r in sorted(tl["kernels"].items(), key=lambda kv: -kv[1]["mean_us"] * kv[1]["per_step"]):
            print(
                f"  {r['per_step']:5.1f}/step  {r['mean_us']:7.2f} µs  gap after {r['gap_after_us']}  {name}"
            )
    except Exception as exc:  # the profiler may not see kernels inside graphs on every driver
        results["timeline_error"] = repr(exc)
        print("timeline failed:", exc)
    del eng, loop
    # the small-batch split-attention shapes, each in the whole captured step
    small = dict(att.DECODE_CONFIGS["small"])
    sweep = {}
    for block, splits, warps in [(64, 8, 4), (32, 16, 2), (32, 8, 2), (64, 8, 2), (32, 16, 4), (16, 32, 2),
                                 (32, 32, 2), (64, 8, 4), (32, 16, 2)]:  # fmt: skip
        att.DECODE_CONFIGS["small"].update(block=block, splits=splits, num_warps=warps)
        eng = CudaGraphEngine(model, max_batch_size=1, max_len=args.context + 64)
        ms = step_ms(_decode_loop(eng, args.context))
        sweep[f"block{block}_splits{splits}_warps{warps}"] = ms
        print(
            f"attention block {block} splits {splits} warps {warps}: {ms * 1e3:.1f} µs, {1e3 / ms:.0f} tok/s"
        )
        del eng
        torch.cuda.empty_cache()
    att.DECODE_CONFIGS["small"].clear()
    att.DECODE_CONFIGS["small"].update(small)
    results["attention_sweep_step_ms"] = sweep
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()

"""Where a batch-1 decode step's time goes on the GPU: the kernels of one replayed step (2B-4T shape, random
weights, the default engine), each kernel's mean duration and the idle time between consecutive kernels, from
the PyTorch profiler (CUPTI) over a few graph replays; then the step's tok/s with other launch shapes
for the attention, each projection and the head, to check the committed tiles in place.

    python benchmarks/gpu_decode_timeline.py [--context 384] [--replays 20] [--out timeline.json]
    python benchmarks/gpu_decode_timeline.py --step-only   # the step alone, three times: for A/B of trees

Kernel times here are the GPU's own (start to end of each kernel in the replay); with programmatic dependent
launch consecutive kernels overlap, so a negative gap means the next kernel started before this one ended.
"""

from __future__ import annotations

import argparse
import collections
import functools
import itertools
import statistics

import torch
from gpu_bench import decode_loop, replay_ms, write_json  # this script's folder is on the path when it runs

from pybitnet.engine.cuda_graph import CudaGraphEngine
from pybitnet.kernels.triton import attention as att
from pybitnet.kernels.triton.matmul import MMConfig
from pybitnet.models.presets import preset
from pybitnet.models.random_init import random_model


def _decode_loop(eng: CudaGraphEngine, context: int):
    """A captured batch-1 decode loop positioned after a `context`-token prompt."""
    prompt = torch.randint(0, 128000, (1, context)).tolist()
    eng.generate(prompt, 4)  # captures the graph, compiles everything
    return decode_loop(eng, prompt)


STEPS_ROOM = 384  # cache positions past the context: a measurement runs ~105 steps, --step-only three
GEMV = functools.partial(MMConfig, num_warps=8, num_stages=1, gemv=True)
# (rows, programs a multiprocessor, warps); with as many programs as tiles, each has one tile
RESIDENT = [(64, 1, 16), (64, 1, 8), (32, 1, 8), (32, 1, 16), (32, 3, 4), (16, 4, 4), (16, 8, 2)]  # fmt: skip
TILE_A_PROGRAM = {  # the tile-a-program shapes the projections ran on before the resident kernel
    "qkv": GEMV(bn=64, bk=2048, private_row=True, num_warps=16),
    "o": GEMV(bn=32, bk=4096),
    "gate_up": GEMV(bn=64, bk=1024, private_row=True),
    "down": GEMV(bn=32, bk=4096, private_row=True, num_warps=16),
}
TILES = {  # alternatives to the committed tiles (matmul.TUNED) of the engine's fused-norm one-row GEMVs
    name: [GEMV(bn=bn, resident=res, num_warps=nw) for bn, res, nw in RESIDENT] + [tile]
    for name, tile in TILE_A_PROGRAM.items()
}


def resident_spec(text: str) -> tuple[str, list[tuple[int, int, int]]]:
    """NAME=ROWS/PROGRAMS/WARPS,... -> (projection, [(rows, programs a multiprocessor, warps), ...])."""
    name, _, shapes = text.partition("=")
    try:
        parsed = [tuple(int(v) for v in s.split("/")) for s in shapes.split(",")]
    except ValueError:
        parsed = []
    if name not in TILES or not parsed or any(len(p) != 3 or min(p) < 1 for p in parsed):
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected NAME=ROWS/PROGRAMS/WARPS[,...] with NAME one of {', '.join(TILES)}"
        )
    return name, parsed


def in_step(eng: CudaGraphEngine, context: int) -> float:
    """ms a step of the engine's batch-1 decode graph, captured again (after a change of launch shapes)."""
    eng._loops.clear()
    torch.cuda.empty_cache()
    return step_ms(_decode_loop(eng, context))


def step_ms(loop, steps: int = 100) -> float:
    """ms a step over `steps` replays, after 5 more to warm up."""
    replay_ms(loop, 5)
    return replay_ms(loop, steps)


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
    ap.add_argument("--projections", default="qkv,o,gate_up,down", help="whose tiles the in-step sweep tries")
    ap.add_argument("--tiles", type=int, default=None, help="only the last N alternatives of each projection")
    ap.add_argument(
        "--resident",
        type=resident_spec,
        action="append",
        default=[],
        metavar="NAME=ROWS/PROGRAMS/WARPS,...",
        help="try these resident-program shapes for a projection instead of its list (repeatable)",
    )
    ap.add_argument("--no-attention", action="store_true", help="skip the attention shapes in the sweep")
    ap.add_argument("--decode-steps", type=int, default=None, help="the engine's decode steps a graph replay")
    ap.add_argument(
        "--step-only",
        action="store_true",
        help="only the default step, measured three times in a row (the context grows ~110 tokens each): to "
        "compare two trees, run each in its own process with PYTHONPATH set to its src, alternated",
    )
    args = ap.parse_args()
    for name, shapes in args.resident:
        TILES[name] = [GEMV(bn=bn, resident=res, num_warps=nw) for bn, res, nw in shapes]
    torch.manual_seed(0)
    model = random_model(preset("bitnet-2b-4t"), seed=0, dtype=torch.bfloat16, kernel="reference").cuda()
    results: dict = {"context": args.context}
    opts = {} if args.decode_steps is None else {"decode_steps": args.decode_steps}
    eng = CudaGraphEngine(model, max_batch_size=1, max_len=args.context + STEPS_ROOM, **opts)
    loop = _decode_loop(eng, args.context)
    results["default_step_ms"] = step_ms(loop)
    print(f"default engine: {results['default_step_ms'] * 1e3:.1f} µs a step")
    if args.step_only:
        later = results["later_step_ms"] = [step_ms(loop) for _ in range(2)]
        print(f"then, ~110 and ~220 tokens further: {later[0] * 1e3:.1f}, {later[1] * 1e3:.1f} µs")
        return write_json(results, args.out)
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
    # in the whole captured step (a launch shape fastest alone need not be fastest between its neighbours):
    # the split-attention shapes, then each projection's one-row tiles and the int8 head's
    eng = CudaGraphEngine(model, max_batch_size=1, max_len=args.context + STEPS_ROOM, **opts)
    small = dict(att.DECODE_CONFIGS["small"])
    sweep = results["in_step_ms"] = {"default": in_step(eng, args.context)}
    shapes = [(64, 8, 4, 1), (64, 8, 2, 1), (32, 16, 4, 1), (32, 16, 2, 2), (32, 8, 2, 1), (16, 16, 2, 1)]
    for block, splits, warps, stages in [] if args.no_attention else shapes:
        att.DECODE_CONFIGS["small"].update(block=block, splits=splits, num_warps=warps, num_stages=stages)
        key = f"attention {block} positions x {splits} splits, {warps} warps, {stages} stages"
        sweep[key] = in_step(eng, args.context)
        att.DECODE_CONFIGS["small"].update(small)
    for name in args.projections.split(","):
        for cfg in TILES[name][-args.tiles if args.tiles else 0 :]:
            eng.forward.configs[(name, 1)] = cfg
            try:
                sweep[f"{name} {cfg}"] = in_step(eng, args.context)
            except Exception as exc:  # a shape the kernel cannot take: recorded, the sweep goes on
                sweep[f"{name} {cfg}"] = repr(exc)[:200]
            del eng.forward.configs[(name, 1)]
    sweep["default again"] = in_step(eng, args.context)
    for key, ms in sweep.items():
        print(f"{key}: {ms * 1e3:.1f} µs, {1e3 / ms:.0f} tok/s" if isinstance(ms, float) else f"{key}: {ms}")
    write_json(results, args.out)


if __name__ == "__main__":
    main()

"""Where each one-row projection of a batch-1 decode step spends its time, seen from inside the kernel: the
resident GEMV's programs write their multiprocessor's cycle counter at each step (`matmul.PROBE_POINTS`:
start, the wait for the previous kernel passed, the row's sum of squares, its absmax, the words quantized,
the products, the output stored) and the GPU's global timer at the start, the wait and the store, in one
replay of the captured 2B-4T decode step (random weights, the default engine).

    python benchmarks/gpu_gemv_probe.py [--context 384] [--replays 5] [--out probe.json]

Per projection, medians over layers and programs: the time from each point to the next (cycles converted to
µs by each program's own cycles per global-timer ns), how long a program had started before its wait ended
(the head start dependent launch gives it), and the link: from the last program of the kernel before the
projection storing to the first of the projection's programs passing its wait.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
from gpu_decode_timeline import STEPS_ROOM, _decode_loop

from pybitnet.engine.cuda_graph import CudaGraphEngine
from pybitnet.kernels.triton import matmul
from pybitnet.models.presets import preset
from pybitnet.models.random_init import random_model

NAMES = ("qkv", "o", "gate_up", "down")  # the step's GEMV launches, in order, each layer
POINTS = matmul.PROBE_POINTS
CYCLES = POINTS.index("stored") + 1  # the points that hold cycle counts


def launches(buf: torch.Tensor) -> list[torch.Tensor]:
    """The rows one replay wrote (each [programs, points], programs that ran), in launch order."""
    rows = []
    for row in buf:
        ran = row[:, POINTS.index("global stored")] > 0
        if ran.any():
            rows.append(row[ran].double())
    return rows


def per_projection(rows: list[torch.Tensor]) -> dict:
    """Median µs of each step and of the links, per projection."""
    out: dict = {name: {"phases": {}, "links": [], "head_start": []} for name in NAMES}
    g_start, g_wait, g_end = (POINTS.index(p) for p in ("global start", "global waited", "global stored"))
    for i, row in enumerate(rows):
        name = NAMES[i % len(NAMES)]
        # each program's cycles per ns, from its own start and store
        rate = (row[:, CYCLES - 1] - row[:, 0]) / (row[:, g_end] - row[:, g_start]).clamp(min=1)
        rate = rate.median().item()
        for p in range(1, CYCLES):
            delta = ((row[:, p] - row[:, p - 1]) / rate / 1e3).median().item()
            out[name]["phases"].setdefault(f"{POINTS[p - 1]} -> {POINTS[p]}", []).append(delta)
        out[name]["head_start"].append(((row[:, g_wait] - row[:, g_start]) / 1e3).median().item())
        if i:
            out[name]["links"].append((row[:, g_wait].min() - rows[i - 1][:, g_end].max()).item() / 1e3)
    return {
        name: {
            "phases_us": {k: round(statistics.median(v), 3) for k, v in r["phases"].items()},
            "started_before_its_wait_ended_us": round(statistics.median(r["head_start"]), 3),
            "link_us (last store of the kernel before -> first wait passed)": round(
                statistics.median(r["links"]), 3
            )
            if r["links"]
            else None,
        }
        for name, r in out.items()
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=384)
    ap.add_argument("--replays", type=int, default=5, help="replays before the probed one")
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = random_model(preset("bitnet-2b-4t"), seed=0, dtype=torch.bfloat16, kernel="reference").cuda()
    layers = model.config.num_hidden_layers
    programs = 4 * torch.cuda.get_device_properties(0).multi_processor_count
    # room for every launch of the warm-up steps and the capture: rows are taken in launch order, cycling
    shape = (64 * len(NAMES) * layers, programs, len(POINTS))
    matmul.PROBE = torch.zeros(shape, dtype=torch.int64, device="cuda")
    eng = CudaGraphEngine(model, max_batch_size=1, max_len=args.context + STEPS_ROOM)
    loop = _decode_loop(eng, args.context)
    for _ in range(args.replays):
        loop.run()
    matmul.PROBE.zero_()
    loop.run()
    torch.cuda.synchronize()
    rows = launches(matmul.PROBE.cpu())
    if len(rows) != len(NAMES) * layers:
        raise SystemExit(f"expected {len(NAMES) * layers} probed launches in a step, found {len(rows)}")
    result = {"context": args.context, "projections": per_projection(rows)}
    for name, r in result["projections"].items():
        print(f"{name}:")
        for key, v in r.items():
            print(f"  {key}: {v}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()

"""Where each one-row projection of a batch-1 decode step, and the attention between q/k/v and o, spend
their time, seen from inside the kernels: the resident GEMV's programs write their multiprocessor's cycle
counter at each step (`matmul.PROBE.points`: start, the wait for the previous kernel passed, the row's sum
of squares, its absmax, the words quantized, the products, the output stored), the decode attention's
programs theirs (`attention.PROBE.points`: start, waited, q roped, its positions attended, the split's partial
stored and counted, done — after its part of combining the splits, where it has one), and both the
GPU's global timer at the start, the wait and the end, in one replay of the captured 2B-4T decode step
(random weights, the default engine).

    python benchmarks/gpu_gemv_probe.py [--context 384] [--replays 5] [--out probe.json]

Per projection, medians over layers and programs: the time from each point to the next (cycles converted to
µs by each program's own cycles per global-timer ns), how long a program had started before its wait ended
(the head start dependent launch gives it), and the link: from the last program of the kernel before
storing to the first of this kernel's programs passing its wait (for q/k/v: the down before it, or the
embedding; for o: the attention). The attention's steps are over its programs with positions to attend;
"combine": the time from arriving to done of the programs that combined the splits (the median of the
longest, one a KV head: at batch 1 every split waits for the others and combines a share of the columns).
"""

from __future__ import annotations

import argparse
import statistics

import torch
from gpu_bench import write_json
from gpu_decode_timeline import STEPS_ROOM, _decode_loop

from pybitnet.engine.cuda_graph import CudaGraphEngine
from pybitnet.kernels.triton import attention, matmul
from pybitnet.kernels.triton.common import multiprocessors
from pybitnet.models.presets import preset
from pybitnet.models.random_init import random_model

NAMES = ("qkv", "o", "gate_up", "down")  # the step's GEMV launches, in order, each layer
POINTS = matmul.PROBE.points
CYCLES = POINTS.index("stored") + 1  # the points that hold cycle counts
ATT = attention.PROBE.points
ATT_CYCLES = ATT.index("done") + 1


def launches(buf: torch.Tensor, end: int) -> list[torch.Tensor]:
    """The rows one replay wrote (each [programs, points], programs that ran: a global time at `end`), in
    launch order."""
    rows = []
    for row in buf:
        ran = row[:, end] > 0
        if ran.any():
            rows.append(row[ran].double())
    return rows


def _cycles_per_ns(row: torch.Tensor, first: int, last: int, g_first: int, g_last: int) -> torch.Tensor:
    """Each program's cycle-counter rate, from its own first and last stamps."""
    return (row[:, last] - row[:, first]) / (row[:, g_last] - row[:, g_first]).clamp(min=1)


def attention_steps(att: list[torch.Tensor], gemv: list[torch.Tensor], kv_heads: int) -> dict:
    """Median µs of the attention's steps over layers (and its active programs), of the splits' combination
    and of the links: q/k/v's last store -> the attention's first wait passed, its last program done -> o's
    first wait passed."""
    g_start, g_wait, g_done = (ATT.index(p) for p in ("global start", "global waited", "global done"))
    stored, waited = POINTS.index("global stored"), POINTS.index("global waited")
    steps: dict = {}
    combine, into, out_of, head_start = [], [], [], []
    for layer, row in enumerate(att):
        rate = _cycles_per_ns(row, 0, ATT_CYCLES - 1, g_start, g_done)
        active = row[:, ATT.index("roped")] > 0
        for p in range(1, ATT_CYCLES):
            if p == ATT.index("done"):
                continue
            delta = (row[active, p] - row[active, p - 1]) / rate[active] / 1e3
            steps.setdefault(f"{ATT[p - 1]} -> {ATT[p]}", []).append(delta.median().item())
        tail = (row[active, ATT.index("done")] - row[active, ATT.index("arrived")]) / rate[active] / 1e3
        combine.append(tail.topk(min(kv_heads, len(tail))).values.median().item())
        head_start.append(((row[:, g_wait] - row[:, g_start]) / 1e3).median().item())
        qkv, o = gemv[len(NAMES) * layer], gemv[len(NAMES) * layer + 1]
        into.append((row[:, g_wait].min() - qkv[:, stored].max()).item() / 1e3)
        out_of.append((o[:, waited].min() - row[:, g_done].max()).item() / 1e3)
    med = statistics.median
    return {
        "steps_us": {k: round(med(v), 3) for k, v in steps.items()},
        "combine_us (arrived -> done, the combining programs)": round(med(combine), 3),
        "started_before_its_wait_ended_us": round(med(head_start), 3),
        "link_us (q/k/v's last store -> first wait passed)": round(med(into), 3),
        "link_us (last program done -> o's first wait passed)": round(med(out_of), 3),
    }


def per_projection(rows: list[torch.Tensor]) -> dict:
    """Median µs of each step and of the links, per projection."""
    out: dict = {name: {"phases": {}, "links": [], "head_start": []} for name in NAMES}
    g_start, g_wait, g_end = (POINTS.index(p) for p in ("global start", "global waited", "global stored"))
    for i, row in enumerate(rows):
        name = NAMES[i % len(NAMES)]
        # each program's cycles per ns, from its own start and store
        rate = _cycles_per_ns(row, 0, CYCLES - 1, g_start, g_end).median().item()
        for p in range(1, CYCLES):
            delta = ((row[:, p] - row[:, p - 1]) / rate / 1e3).median().item()
            out[name]["phases"].setdefault(f"{POINTS[p - 1]} -> {POINTS[p]}", []).append(delta)
        out[name]["head_start"].append(((row[:, g_wait] - row[:, g_start]) / 1e3).median().item())
        if i and name != "o":  # o's kernel before is the attention (see attention_steps)
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
    programs = 4 * multiprocessors(0)
    # room for every launch of the warm-up steps and the capture: rows are taken in launch order, cycling
    matmul.PROBE.buffer = torch.zeros((64 * len(NAMES) * layers, programs, len(POINTS)), dtype=torch.int64,
                                      device="cuda")  # fmt: skip
    kv_heads = model.config.num_key_value_heads
    att_programs = kv_heads * max(c.get("splits", 1) for c in attention.DECODE_CONFIGS.values())
    attention.PROBE.buffer = torch.zeros(
        (64 * layers, att_programs, len(ATT)), dtype=torch.int64, device="cuda"
    )
    eng = CudaGraphEngine(model, max_batch_size=1, max_len=args.context + STEPS_ROOM)
    loop = _decode_loop(eng, args.context)
    for _ in range(args.replays):
        loop.run()
    matmul.PROBE.buffer.zero_()
    attention.PROBE.buffer.zero_()
    loop.run()
    torch.cuda.synchronize()
    rows = launches(matmul.PROBE.buffer.cpu(), POINTS.index("global stored"))
    att = launches(attention.PROBE.buffer.cpu(), ATT.index("global done"))
    if len(rows) != len(NAMES) * layers or len(att) != layers:
        raise SystemExit(f"expected {len(NAMES) * layers} probed GEMVs and {layers} attentions in a step, "
                         f"found {len(rows)} and {len(att)}")  # fmt: skip
    result = {
        "context": args.context,
        "projections": per_projection(rows),
        "attention": attention_steps(att, rows, kv_heads),
    }
    for name, r in [*result["projections"].items(), ("attention", result["attention"])]:
        print(f"{name}:")
        for key, v in r.items():
            print(f"  {key}: {v}")
    write_json(result, args.out)


if __name__ == "__main__":
    main()

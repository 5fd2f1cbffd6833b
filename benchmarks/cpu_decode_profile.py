"""Where a decode step's time goes on the C kernels: CPU time per token by native call and Python/torch work.

CPU time (not wall time) is measured so that other load on a shared machine distorts it less; with one thread
it is the work per token. Builds a random model of a preset's shape.

    python benchmarks/cpu_decode_profile.py [--preset bitnet-2b-4t] [--layers 30] [--tokens 32] [--threads 1]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch

from pybitnet.bench import run_tg
from pybitnet.kernels import cpu
from pybitnet.models.presets import preset
from pybitnet.models.random_init import random_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="bitnet-2b-4t")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    overrides = {} if args.layers is None else {"num_hidden_layers": args.layers}
    model = random_model(preset(args.preset, **overrides), kernel="cpu")
    torch.set_num_threads(1)
    cpu.set_num_threads(args.threads)
    n = args.tokens
    with torch.inference_mode():
        run_tg(model, n)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        run_tg(model, n)
        cpu_ms, wall_ms = (time.process_time() - cpu0) / n * 1e3, (time.perf_counter() - wall0) / n * 1e3
        prof = cProfile.Profile(time.process_time)
        prof.enable()
        run_tg(model, n)
        prof.disable()
    print(f"{args.preset}, {model.config.num_hidden_layers} layers, {args.threads} kernel threads")
    print(f"per token: CPU {cpu_ms:.1f} ms, wall {wall_ms:.1f} ms ({1e3 / wall_ms:.2f} tok/s)")
    stats = pstats.Stats(prof)
    total = sum(v[2] for v in stats.stats.values())
    for (_, _, name), (_, calls, tottime, _, _) in sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:12]:
        share = tottime / total
        print(f"  {tottime / n * 1e3:7.2f} ms/token {share:6.1%}  {calls // n:5d} calls/token  {name}")


if __name__ == "__main__":
    main()

"""Where a decode step's time goes on the C kernels: wall time per token in each native call (the layers, the
head) and in everything else (Python, torch), then a profile of that rest by CPU time.

The native calls are timed by wall clock around each call (their worker threads spin, so CPU time would count
them twice); the rest's profile uses CPU time, which other load on a shared machine distorts less. Builds a
random model of a preset's shape.

    python benchmarks/cpu_decode_profile.py [--preset bitnet-2b-4t] [--layers 30] [--tokens 32] [--threads 1]
"""

from __future__ import annotations

import argparse
import collections
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
    native = cpu._native
    spent: dict[str, float] = collections.defaultdict(float)

    class Timed:  # the native module with each call timed by wall clock
        def __getattr__(self, name: str):
            fn = getattr(native, name)
            if not callable(fn):
                return fn

            def timed(*a):
                t = time.perf_counter()
                try:
                    return fn(*a)
                finally:
                    spent[name] += time.perf_counter() - t

            return timed

    with torch.inference_mode():
        run_tg(model, n)
        cpu._native = Timed()
        try:
            wall_ms = run_tg(model, n) / n * 1e3
        finally:
            cpu._native = native
        prof = cProfile.Profile(time.process_time)
        prof.enable()
        run_tg(model, n)
        prof.disable()
    print(f"{args.preset}, {model.config.num_hidden_layers} layers, {args.threads} kernel threads")
    print(f"per token: wall {wall_ms:.2f} ms ({1e3 / wall_ms:.2f} tok/s)")
    for name, s in sorted(spent.items(), key=lambda kv: -kv[1]):
        print(f"  {s / n * 1e3:7.2f} ms/token in native {name}")
    print(f"  {wall_ms - sum(spent.values()) / n * 1e3:7.2f} ms/token outside native calls; by CPU time:")
    stats = pstats.Stats(prof)
    total = sum(v[2] for v in stats.stats.values())
    for (_, _, name), (_, calls, tottime, _, _) in sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:12]:
        share = tottime / total
        print(f"  {tottime / n * 1e3:7.2f} ms/token {share:6.1%}  {calls // n:5d} calls/token  {name}")


if __name__ == "__main__":
    main()

"""Sampling cost per token on the CPU, 128,256-token vocabulary: `engine.sampler.sample` against the method it
replaced, which is also vLLM's torch-native one (sort the whole vocabulary for top-k / top-p, then argmax of
p / E with E ~ Exp(1) noise over every token), timed in the same run on the same logits.

    python benchmarks/cpu_sampling.py [--vocab 128256] [--reps 30]

Two logit rows: peaked (randn x 3, a nucleus of a few thousand tokens at temperature 0.8) and flat (randn x
0.3, nearly the whole vocabulary: the worst case for a search that sorts only the likeliest tokens).
"""

from __future__ import annotations

import argparse
import time

import torch

from pybitnet import SamplingParams
from pybitnet.engine.sampler import SamplingBatch, keep_prefix, sample

SETTINGS = [
    SamplingParams(temperature=0.8),
    SamplingParams(temperature=0.8, top_p=0.95),
    SamplingParams(temperature=0.8, top_k=40),
    SamplingParams(temperature=0.8, top_k=50, top_p=0.9),
]


def full_sort_sample(logits: torch.Tensor, batch: SamplingBatch, g: torch.Generator) -> torch.Tensor:
    """The replaced method: full sort for the filters, Exp(1) noise over the whole vocabulary."""
    probs = torch.softmax(logits / batch.temperature[:, None], dim=-1)
    if bool((batch.top_k >= probs.shape[-1]).all() and (batch.top_p >= 1).all()):  # no filter: no sort
        return (probs / torch.empty_like(probs).exponential_(generator=g)).argmax(dim=-1)
    probs = keep_prefix(probs, *probs.sort(dim=-1, descending=True), batch.top_k, batch.top_p)
    return (probs / torch.empty_like(probs).exponential_(generator=g)).argmax(dim=-1)


def ms_per_call(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--reps", type=int, default=30)
    args = ap.parse_args()
    if args.vocab < 2 or args.reps < 1:
        ap.error("--vocab must be at least 2 and --reps at least 1")
    torch.manual_seed(0)
    print(f"torch threads {torch.get_num_threads()}, vocabulary {args.vocab}")
    for name, scale in [("peaked", 3.0), ("flat", 0.3)]:
        logits = torch.randn(1, args.vocab) * scale
        for p in SETTINGS:
            batch = SamplingBatch.from_params([p], [None], args.vocab)
            g = torch.Generator().manual_seed(0)
            ours = ms_per_call(lambda x=logits, b=batch, g=g: sample(x, b, g), args.reps)
            before = ms_per_call(lambda x=logits, b=batch, g=g: full_sort_sample(x, b, g), args.reps)
            print(f"{name:6s} temperature {p.temperature} top_p {p.top_p} top_k {p.top_k}: {ours:6.2f} ms, "
                  f"full sort + Exp noise {before:6.2f} ms ({before / ours:.1f}x)")  # fmt: skip


if __name__ == "__main__":
    main()

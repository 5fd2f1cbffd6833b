"""The int8 per-row output head against the bf16 head: top-1 agreement and perplexity, same model, same tokens.

No real checkpoint is reachable here, so the model is a random ternary model of the bitnet-2b-4t shape and the
text is the model's own: continuations sampled (temperature 1) with the bf16 head from random prompts. Both
heads then score those tokens; perplexity is exp(mean NLL) of the sampled tokens.

    python benchmarks/cpu_head_quality.py [--layers 30] [--seqs 4] [--len 128]
"""

from __future__ import annotations

import argparse
import math

import torch

from pybitnet.models.presets import preset
from pybitnet.models.random_init import random_model


def sample(model, prompts: torch.Tensor, n: int, g: torch.Generator) -> torch.Tensor:
    b, t = prompts.shape
    cache = model.new_cache(b, t + n)
    ids = prompts
    logits = model(ids, torch.arange(t).expand(b, -1), cache, last_only=True)
    for pos in range(t, t + n):
        nxt = torch.multinomial(logits[:, -1].softmax(-1), 1, generator=g)
        ids = torch.cat([ids, nxt], 1)
        logits = model(nxt, torch.full((b, 1), pos), cache, last_only=True)
    return ids


def score(model, ids: torch.Tensor, start: int) -> tuple[torch.Tensor, float]:
    logits = model(ids)[:, start - 1 : -1]
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, start:].flatten())
    return logits.argmax(-1), math.exp(nll.item())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--seqs", type=int, default=4)
    ap.add_argument("--len", type=int, default=128)
    args = ap.parse_args()
    model = random_model(preset("bitnet-2b-4t", num_hidden_layers=args.layers), seed=0)
    with torch.inference_mode():
        head = model.lm_head.weight
        model.lm_head.weight = torch.nn.Parameter(head.to(torch.bfloat16).float(), requires_grad=False)
        model.head_mode = "float"
        g = torch.Generator().manual_seed(0)
        prompts = torch.randint(0, model.config.vocab_size, (args.seqs, 8), generator=g)
        ids = sample(model, prompts, args.len, g)
        top_bf16, ppl_bf16 = score(model, ids, 8)
        model.lm_head.weight = head
        model.head_mode = "int8"
        top_int8, ppl_int8 = score(model, ids, 8)
    agree = (top_bf16 == top_int8).float().mean().item()
    print(f"bitnet-2b-4t shape ({args.layers} layers), {args.seqs} x {args.len} sampled tokens")
    print(f"top-1 agreement int8 vs bf16 head: {agree:.2%}")
    print(f"perplexity bf16 head {ppl_bf16:.3f}, int8 head {ppl_int8:.3f} ({ppl_int8 / ppl_bf16 - 1:+.3%})")


if __name__ == "__main__":
    main()

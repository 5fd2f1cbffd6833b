"""The int8 and 4-bit per-row output heads against the bf16 head: top-1 agreement and perplexity on the same
tokens.

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
    return logits, math.exp(nll.item())


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
        ref, ppl_bf16 = score(model, ids, 8)
        model.lm_head.weight = head
        scored = {}
        for mode in ("int8", "int4"):
            model.head_mode = mode
            scored[mode] = score(model, ids, 8)
    print(f"bitnet-2b-4t shape ({args.layers} layers), {args.seqs} x {args.len} sampled tokens")
    for mode, (got, ppl) in scored.items():
        agree = (ref.argmax(-1) == got.argmax(-1)).float().mean().item()
        kl = torch.nn.functional.kl_div(
            got.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="none"
        )
        rel = ((got - ref).pow(2).mean() / ref.pow(2).mean()).sqrt().item()
        print(f"{mode} head vs bf16 head: top-1 agreement {agree:.2%}")
        print(f"  perplexity bf16 {ppl_bf16:.4f}, {mode} {ppl:.4f} ({ppl / ppl_bf16 - 1:+.3%})")
        print(
            f"  mean KL(bf16 || {mode}) {kl.sum(-1).mean().item():.2e} nats; "
            f"relative RMS logit error {rel:.2e}"
        )
    print(f"logit scale: std {ref.std().item():.1f} (random weights: far more peaked than a trained model's)")


if __name__ == "__main__":
    main()

"""Greedy decoding straight on a Transformer and its KV cache, without the engine: the plain reference that
kernels, engines and exports are checked against."""

from __future__ import annotations

import torch

from .transformer import Transformer


@torch.inference_mode()
def greedy_decode(model: Transformer, prompt: list[int], n: int) -> list[int]:
    """The n argmax tokens after `prompt`: one prefill forward, then one forward per token."""
    device = model.device
    cache = model.new_cache(1, len(prompt) + n)
    positions = torch.arange(len(prompt), device=device)[None]
    logits = model(torch.tensor([prompt], device=device), positions, cache, last_only=True)[:, -1]
    out: list[int] = []
    for i in range(n):
        out.append(int(logits.argmax(-1)))
        step = torch.tensor([[out[-1]]], device=device)
        logits = model(step, torch.tensor([[len(prompt) + i]], device=device), cache)[:, -1]
    return out

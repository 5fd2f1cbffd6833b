"""Token sampling for a batch of sequences, each with its own SamplingParams.

Order (as vLLM): penalties on the logits, then temperature, then min-p, top-k and top-p on the probabilities;
a temperature of 0 is greedy (argmax of the penalized logits). A sampled token is drawn as argmax(p / E) with
E ~ Exp(1) noise from the sequence's own generator (when it has a seed), so a seeded sequence draws the same
tokens whatever else shares its batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .params import SamplingParams


@dataclass
class SamplingBatch:
    """Per-row sampling parameters as tensors (one row per sequence)."""

    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    min_p: torch.Tensor
    greedy: torch.Tensor
    generators: list[torch.Generator | None]

    @classmethod
    def from_params(
        cls,
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator | None],
        vocab_size: int,
        device: torch.device | str = "cpu",
    ) -> SamplingBatch:
        def t(values, dtype=torch.float32):
            return torch.tensor(values, dtype=dtype, device=device)

        return cls(
            temperature=t([p.temperature for p in params]),
            top_k=t([min(p.top_k, vocab_size) if p.top_k > 0 else vocab_size for p in params], torch.long),
            top_p=t([p.top_p for p in params]),
            min_p=t([p.min_p for p in params]),
            greedy=t([p.greedy for p in params], torch.bool),
            generators=list(generators),
        )


def apply_penalties(
    logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor, counts: torch.Tensor
) -> torch.Tensor:
    """Penalize one row of logits [V] in place. `seen` [V] bool marks tokens of the prompt or output (for the
    repetition penalty); `counts` [V] counts the output tokens (for presence and frequency penalties)."""
    if params.repetition_penalty != 1.0:
        rp = params.repetition_penalty
        penalized = torch.where(logits > 0, logits / rp, logits * rp)
        logits.copy_(torch.where(seen, penalized, logits))
    if params.frequency_penalty != 0.0:
        logits -= params.frequency_penalty * counts.to(logits.dtype)
    if params.presence_penalty != 0.0:
        logits -= params.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def filtered_probs(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Probabilities [n, V] after temperature, min-p, top-k and top-p; tokens filtered out get exactly 0."""
    temperature = torch.where(batch.greedy, torch.ones_like(batch.temperature), batch.temperature)
    probs = torch.softmax(logits / temperature[:, None], dim=-1)
    if bool((batch.min_p > 0).any()):
        threshold = batch.min_p[:, None] * probs.amax(dim=-1, keepdim=True)
        probs = probs.masked_fill(probs < threshold, 0.0)
    vocab = probs.shape[-1]
    if bool((batch.top_k < vocab).any()) or bool((batch.top_p < 1).any()):
        sorted_p, order = probs.sort(dim=-1, descending=True)
        rank = torch.arange(vocab, device=probs.device)
        keep = rank[None, :] < batch.top_k[:, None]
        sorted_p = sorted_p * keep
        # top-p over what top-k kept: the smallest prefix whose mass reaches top_p (always >= 1 token)
        mass_before = sorted_p.cumsum(dim=-1) - sorted_p
        total = sorted_p.sum(dim=-1, keepdim=True)
        keep &= (mass_before < batch.top_p[:, None] * total) | (batch.top_p[:, None] >= 1)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p * keep)
    return probs


def exponential_noise(
    shape: tuple[int, int],
    generators: Sequence[torch.Generator | None],
    default: torch.Generator | None,
    device,
) -> torch.Tensor:
    """Exp(1) noise [n, V]: rows with their own generator draw from it, the others from `default`."""
    noise = torch.empty(shape, device=device)
    shared = [i for i, g in enumerate(generators) if g is None]
    if shared:
        rows = torch.empty((len(shared), shape[1]), device=device).exponential_(generator=default)
        noise[shared] = rows
    for i, g in enumerate(generators):
        if g is not None:
            noise[i].exponential_(generator=g)
    return noise


def sample(
    logits: torch.Tensor, batch: SamplingBatch, default: torch.Generator | None = None
) -> torch.Tensor:
    """Token ids [n] for logits [n, V] (already penalized)."""
    greedy_tokens = logits.argmax(dim=-1)
    if bool(batch.greedy.all()):
        return greedy_tokens
    probs = filtered_probs(logits.float(), batch)
    noise = exponential_noise(tuple(probs.shape), batch.generators, default, probs.device)
    sampled = (probs / noise).argmax(dim=-1)
    return torch.where(batch.greedy, greedy_tokens, sampled)


def top_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, n: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """For rows of raw logits [m, V] and their sampled tokens [m]: the sampled tokens' log-probabilities and
    ranks (1 = most likely), and the `n` most likely tokens' ids and log-probabilities ([m, n] each)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(-1, tokens[:, None])
    ranks = (logprobs > chosen).sum(dim=-1) + 1
    top_values, top_ids = logprobs.topk(n, dim=-1) if n > 0 else (logprobs[:, :0], tokens[:, None][:, :0])
    return chosen[:, 0], ranks, top_ids, top_values

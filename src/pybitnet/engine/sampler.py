"""Token sampling for a batch of sequences, each with its own SamplingParams.

Order (as vLLM): penalties on the logits, then temperature, then min-p, top-k and top-p on the probabilities;
a temperature of 0 is greedy (argmax of the penalized logits). A sampled token is drawn by inverting the
filtered distribution's running sum at one U[0, 1) number from the sequence's own generator (when it has a
seed), so a seeded sequence draws the same tokens whatever else shares its batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..kernels import cpu as cpu_kernels
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
    filtered = (batch.top_k < vocab) | (batch.top_p < 1)
    if bool(filtered.any()):
        probs = torch.where(filtered[:, None], _top_k_top_p(probs, batch.top_k, batch.top_p), probs)
    return probs


# Tokens sorted at first for top-k / top-p (more when the filters' prefix does not end among them): a full
# sort of a 128k vocabulary takes ~13 ms on a CPU core, the most likely 1,024 by torch.topk ~0.9 ms.
CANDIDATES = 1024


def keep_prefix(
    probs: torch.Tensor,
    sorted_p: torch.Tensor,
    order: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    total: torch.Tensor | None = None,
) -> torch.Tensor:
    """probs [n, V] with only the filters' prefix kept, from each row's c most likely tokens (sorted_p
    descending, order their ids): the first top_k, then of those the smallest prefix whose mass reaches top_p
    of `total` [n, 1] (default: the top-k tokens' mass among the candidates); always >= 1 token. No host
    synchronization, so a CUDA graph can capture it."""
    keep = torch.arange(sorted_p.shape[-1], device=probs.device)[None, :] < top_k[:, None]
    sorted_p = sorted_p * keep
    total = sorted_p.sum(dim=-1, keepdim=True) if total is None else total
    mass_before = sorted_p.cumsum(dim=-1) - sorted_p
    keep &= (mass_before < top_p[:, None] * total) | (top_p[:, None] >= 1)
    return torch.zeros_like(probs).scatter_(-1, order, sorted_p * keep)


def _top_k_top_p(probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """`keep_prefix` of probs with only the c most likely tokens sorted, c at least every row's top-k; a row
    whose top-p prefix might not end among them (their mass below top_p of its total) makes c eight times
    larger, and the whole vocabulary is sorted once c would pass a quarter of it (where torch.topk is slower
    than a sort) or eight times c cannot hold the prefix either.
    """
    vocab = probs.shape[-1]
    active_k = top_k[top_k < vocab]
    c = max(CANDIDATES, int(active_k.max()) if active_k.numel() else 0)
    c = vocab if 4 * c > vocab else c
    row_total = probs.sum(dim=-1, keepdim=True)
    while True:
        sorted_p, order = probs.sort(dim=-1, descending=True) if c == vocab else probs.topk(c, dim=-1)
        in_k = torch.arange(c, device=probs.device)[None, :] < top_k[:, None]
        mass = (sorted_p * in_k).sum(dim=-1, keepdim=True)
        # the top-k set's mass: among the candidates when it fits in them, else (top-k off) the whole row's
        total = torch.where(top_k[:, None] <= c, mass, row_total)
        need = top_p[:, None] * total
        if c == vocab or bool(((mass >= need)[:, 0] | (top_k <= c)).all()):
            break
        # the 8c most likely hold at most 8 times the c most likely's mass: when even that falls short (a
        # flat row), go straight to the full sort
        reachable = bool(((8 * mass >= need)[:, 0] | (top_k <= c)).all())
        c = 8 * c if reachable and 32 * c <= vocab else vocab
    return keep_prefix(probs, sorted_p, order, top_k, top_p, total)


def uniform_draws(n: int, generators: Sequence[torch.Generator | None], default: torch.Generator | None,
                  device) -> torch.Tensor:  # fmt: skip
    """One U[0, 1) number per row, in float64: rows with their own generator draw from it, the others from
    `default`."""
    u = torch.empty(n, dtype=torch.float64, device=device)
    shared = [i for i, g in enumerate(generators) if g is None]
    if shared:
        u[shared] = torch.rand(len(shared), dtype=torch.float64, device=device, generator=default)
    for i, g in enumerate(generators):
        if g is not None:
            u[i] = torch.rand(1, dtype=torch.float64, device=device, generator=g)[0]
    return u


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per row, the token where the running sum of probs [n, V] (unnormalized, >= 0) first exceeds u times
    its total: a draw from probs for u ~ U[0, 1). A token of probability 0 is never chosen (the running sum
    does not rise there); float64 sums keep the rounding far below any probability a float32 row holds."""
    cdf = probs.double().cumsum(dim=-1)
    idx = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0]
    last = probs.shape[-1] - 1 - (probs.flip(-1) > 0).int().argmax(dim=-1)  # u * total rounded up to total
    return torch.minimum(idx, last)


def sample(
    logits: torch.Tensor, batch: SamplingBatch, default: torch.Generator | None = None
) -> torch.Tensor:
    """Token ids [n] for logits [n, V] (already penalized)."""
    greedy_tokens = cpu_kernels.argmax(logits)  # torch's argmax, faster on CPU
    if bool(batch.greedy.all()):
        return greedy_tokens
    probs = filtered_probs(logits.float(), batch)
    sampled = inverse_cdf(probs, uniform_draws(probs.shape[0], batch.generators, default, probs.device))
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

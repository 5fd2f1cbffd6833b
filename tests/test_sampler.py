"""Sampler: greedy, temperature, top-k / top-p / min-p allowed sets (statistically), penalties, seeds,
logprobs, and SamplingParams validation."""

from __future__ import annotations

import math

import pytest
import torch

from pybitnet import SamplingParams
from pybitnet.engine.sampler import SamplingBatch, apply_penalties, filtered_probs, sample, top_logprobs
from pybitnet.errors import InvalidRequestError

# A distribution with clear gaps, so every filter's allowed set is unambiguous: p = .30 .20 .15 .10 .08 ...
BASE_PROBS = torch.tensor([0.30, 0.20, 0.15, 0.10, 0.08, 0.06, 0.04, 0.03, 0.02, 0.01, 0.005, 0.005])
DRAWS = 6000


def _shuffled_logits(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of BASE_PROBS in a random token order, and that order (order[i]: the i-th most likely token)."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(BASE_PROBS), generator=g)
    logits = torch.empty(len(BASE_PROBS))
    logits[order] = BASE_PROBS.log() + 3.0
    return logits, order


def _draw(logits: torch.Tensor, params: SamplingParams, n: int = DRAWS, seed: int = 0) -> torch.Tensor:
    batch = SamplingBatch.from_params([params] * n, [None] * n, logits.shape[-1])
    return sample(logits.expand(n, -1).clone(), batch, torch.Generator().manual_seed(seed))


def _check_distribution(tokens: torch.Tensor, allowed: list[int], expected: torch.Tensor) -> None:
    """Every draw is allowed, every allowed token shows up, frequencies match the renormalized ones."""
    drawn = set(tokens.tolist())
    assert drawn <= set(allowed), f"tokens {sorted(drawn - set(allowed))} are outside the allowed set"
    assert drawn == set(allowed), f"allowed tokens {sorted(set(allowed) - drawn)} never drawn"
    freq = torch.bincount(tokens, minlength=len(expected)).float() / len(tokens)
    # 5 standard deviations of a binomial frequency
    tol = 5 * (expected * (1 - expected) / len(tokens)).sqrt() + 1e-3
    assert ((freq - expected).abs() <= tol).all(), (freq, expected)


def _renormalized(logits: torch.Tensor, allowed: list[int], temperature: float = 1.0) -> torch.Tensor:
    p = torch.softmax(logits.double() / temperature, -1)
    mask = torch.zeros_like(p, dtype=torch.bool)
    mask[allowed] = True
    p = torch.where(mask, p, 0)
    return (p / p.sum()).float()


def test_greedy_is_argmax_of_penalized_logits():
    logits = torch.randn(4, 100, generator=torch.Generator().manual_seed(1))
    batch = SamplingBatch.from_params([SamplingParams(temperature=0)] * 4, [None] * 4, 100)
    assert torch.equal(sample(logits, batch), logits.argmax(-1))


def test_temperature_sampling_matches_softmax():
    logits, _ = _shuffled_logits()
    tokens = _draw(logits, SamplingParams(temperature=0.7))
    everything = list(range(len(logits)))
    _check_distribution(tokens, everything, _renormalized(logits, everything, 0.7))


@pytest.mark.parametrize("k", [1, 3, 5])
def test_top_k_never_leaves_the_k_most_likely(k):
    logits, order = _shuffled_logits(k)
    allowed = order[:k].tolist()
    tokens = _draw(logits, SamplingParams(temperature=1.0, top_k=k))
    _check_distribution(tokens, allowed, _renormalized(logits, allowed))


@pytest.mark.parametrize(("p", "kept"), [(0.25, 1), (0.45, 2), (0.7, 4), (0.9, 7)])
def test_top_p_keeps_the_smallest_prefix_reaching_p(p, kept):
    logits, order = _shuffled_logits(kept)
    allowed = order[:kept].tolist()
    tokens = _draw(logits, SamplingParams(temperature=1.0, top_p=p))
    _check_distribution(tokens, allowed, _renormalized(logits, allowed))


@pytest.mark.parametrize(("min_p", "kept"), [(0.6, 2), (0.3, 4), (0.12, 7)])
def test_min_p_drops_tokens_below_the_threshold(min_p, kept):
    logits, order = _shuffled_logits(kept)
    allowed = order[:kept].tolist()  # p >= min_p * 0.30
    tokens = _draw(logits, SamplingParams(temperature=1.0, min_p=min_p))
    _check_distribution(tokens, allowed, _renormalized(logits, allowed))


def test_top_k_then_top_p_on_the_renormalized_distribution():
    # top-k 4 keeps .30 .20 .15 .10 (mass .75); renormalized .40 .267 .2 .133; top-p .6 keeps the first two
    logits, order = _shuffled_logits(3)
    allowed = order[:2].tolist()
    tokens = _draw(logits, SamplingParams(temperature=1.0, top_k=4, top_p=0.6))
    _check_distribution(tokens, allowed, _renormalized(logits, allowed))


def test_filters_apply_per_row():
    logits, order = _shuffled_logits()
    params = [
        SamplingParams(top_k=1),
        SamplingParams(top_p=0.45),
        SamplingParams(min_p=0.3),
        SamplingParams(),
    ]
    batch = SamplingBatch.from_params(params, [None] * 4, len(logits))
    probs = filtered_probs(logits.expand(4, -1), batch)
    kept = [(row > 0).sum().item() for row in probs]
    assert kept == [1, 2, 4, len(logits)]
    assert probs[0, order[0]] > 0


def test_seeded_rows_draw_the_same_tokens_whatever_the_batch():
    logits = torch.randn(3, 1000, generator=torch.Generator().manual_seed(2))
    p = SamplingParams(temperature=1.0)

    def draws(rows, seeds):
        gens = [None if s is None else torch.Generator().manual_seed(s) for s in seeds]
        batch = SamplingBatch.from_params([p] * len(rows), gens, 1000)
        out = []
        for _ in range(20):
            out.append(sample(logits[rows], batch, torch.Generator().manual_seed(99)).tolist())
        return [list(col) for col in zip(*out, strict=True)]

    alone = draws([1], [7])[0]
    together = draws([0, 1, 2], [None, 7, 8])
    assert together[1] == alone
    assert together[2] != alone
    assert draws([1], [7])[0] == alone


def test_repetition_presence_and_frequency_penalties():
    logits = torch.tensor([2.0, -2.0, 1.0, 0.5, 3.0])
    seen = torch.tensor([True, True, False, True, False])
    counts = torch.tensor([0, 2, 0, 1, 0], dtype=torch.int32)
    p = SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    out = apply_penalties(logits.clone(), p, seen, counts)
    expected = torch.tensor([2.0 / 2, -2.0 * 2 - 0.5 - 0.5, 1.0, 0.5 / 2 - 0.25 - 0.5, 3.0])
    assert torch.allclose(out, expected)


def test_top_logprobs_values_and_ranks():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    chosen, ranks, top_ids, top_values = top_logprobs(logits, torch.tensor([2]), 2)
    lp = torch.log_softmax(logits, -1)[0]
    assert math.isclose(chosen.item(), lp[2].item(), rel_tol=1e-6)
    assert ranks.tolist() == [2]
    assert top_ids.tolist() == [[1, 2]]
    assert torch.allclose(top_values[0], lp[[1, 2]])


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": 1.2}, "min_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"presence_penalty": 3.0}, "presence_penalty"),
        ({"frequency_penalty": -2.5}, "frequency_penalty"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
        ({"logprobs": 50}, "logprobs"),
        ({"stop": ["ok", ""]}, "stop"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"seed": 1.5}, "seed"),
    ],
)
def test_invalid_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(InvalidRequestError, match=field):
        SamplingParams(**kwargs)


def test_sampling_params_defaults_and_stop_normalization():
    p = SamplingParams(stop="###")
    assert p.stop_strings == ["###"]
    assert not p.greedy and SamplingParams(temperature=0).greedy
    assert SamplingParams(max_tokens=None).max_tokens is None


def test_out_of_range_seed_is_rejected_and_huge_top_k_means_all_tokens():
    from pybitnet.engine.params import SamplingParams
    from pybitnet.errors import InvalidRequestError

    for seed in (-1, 2**64):
        with pytest.raises(InvalidRequestError, match="seed"):
            SamplingParams(seed=seed).validate()
    SamplingParams(seed=2**64 - 1, top_k=2**70).validate()
    batch = SamplingBatch.from_params([SamplingParams(top_k=2**70, temperature=1.0)], [None], vocab_size=16)
    assert batch.top_k.tolist() == [16]


def _full_sort_filter(probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """top-k then top-p by sorting the whole vocabulary: the definition the candidate search must match."""
    sorted_p, order = probs.sort(dim=-1, descending=True)
    keep = torch.arange(probs.shape[-1])[None, :] < top_k[:, None]
    sorted_p = sorted_p * keep
    mass_before = sorted_p.cumsum(dim=-1) - sorted_p
    keep &= (mass_before < top_p[:, None] * sorted_p.sum(dim=-1, keepdim=True)) | (top_p[:, None] >= 1)
    return torch.zeros_like(probs).scatter_(-1, order, sorted_p * keep)


@pytest.mark.parametrize("candidates", [8, 64, 4096])
def test_top_k_top_p_on_few_candidates_equals_a_full_sort(monkeypatch, candidates):
    """Rows whose filters end among the first candidates, beyond them (the search widens), top-k wider than
    the candidates, and a row with no filter; flat and peaked distributions over 3,000 tokens."""
    from pybitnet.engine import sampler

    monkeypatch.setattr(sampler, "CANDIDATES", candidates)
    g = torch.Generator().manual_seed(5)
    vocab = 3000
    logits = torch.randn(6, vocab, generator=g) * torch.tensor([[0.1], [4.0], [1.0], [0.5], [3.0], [1.0]])
    params = [
        SamplingParams(top_p=0.9),  # flat: the nucleus spans ~2,700 tokens
        SamplingParams(top_p=0.5),  # peaked: a few tokens
        SamplingParams(top_k=20, top_p=0.8),
        SamplingParams(top_k=2000, top_p=0.95),  # top-k wider than the first candidates
        SamplingParams(top_k=7),
        SamplingParams(),  # unfiltered, next to filtered rows
    ]
    batch = SamplingBatch.from_params(params, [None] * 6, vocab)
    probs = torch.softmax(logits, dim=-1)
    want = torch.where(
        ((batch.top_k < vocab) | (batch.top_p < 1))[:, None],
        _full_sort_filter(probs, batch.top_k, batch.top_p),
        probs,
    )
    got = filtered_probs(logits, batch)
    assert torch.equal(got > 0, want > 0)
    assert torch.allclose(got, want, rtol=0, atol=1e-7)
    assert (got[0] > 0).sum() > 2000 and (got[1] > 0).sum() < 50 and (got[4] > 0).sum() == 7


def test_inverse_cdf_never_draws_a_filtered_token():
    from pybitnet.engine.sampler import inverse_cdf

    probs = torch.tensor([[0.0, 0.3, 0.0, 0.7, 0.0], [0.5, 0.0, 0.0, 0.0, 0.5]])
    # u = 1: a product u * total that rounds up to the total lands past the last token of probability > 0
    for u, want in [
        (0.0, [1, 0]),
        (0.29, [1, 0]),
        (0.31, [3, 0]),
        (0.5, [3, 4]),
        (1 - 2**-53, [3, 4]),
        (1.0, [3, 4]),
    ]:
        assert inverse_cdf(probs, torch.full((2,), u, dtype=torch.float64)).tolist() == want


@pytest.mark.parametrize("scale", [0.5, 1.5, 2.5, 4.0])
@pytest.mark.parametrize("top_p", [0.6, 0.9])
def test_top_p_alone_on_few_candidates_equals_a_full_sort(monkeypatch, scale, top_p):
    """One row, top-p only: prefixes ending among the first 8 candidates, among 64 (the search widens once)
    or beyond (the full sort)."""
    from pybitnet.engine import sampler

    monkeypatch.setattr(sampler, "CANDIDATES", 8)
    logits = torch.randn(1, 3000, generator=torch.Generator().manual_seed(int(10 * scale))) * scale
    batch = SamplingBatch.from_params([SamplingParams(top_p=top_p)], [None], 3000)
    probs = torch.softmax(logits, dim=-1)
    want = _full_sort_filter(probs, batch.top_k, batch.top_p)
    got = filtered_probs(logits, batch)
    assert torch.equal(got > 0, want > 0)
    assert torch.allclose(got, want, rtol=0, atol=1e-7)

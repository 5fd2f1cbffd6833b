"""Absmean ternary weights, absmax int8 activations and the straight-through estimators."""

from __future__ import annotations

import pytest
import torch

from pybitnet.quant import (
    TernaryWeight,
    absmax_scale,
    absmean_scale,
    fake_quantize_activations,
    fake_quantize_weight,
    quantize_activations,
    quantize_weight,
    ste_activations,
    ste_weight,
)


def _randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def test_quantize_weight_is_absmean_ternary():
    w = _randn(37, 53)
    tw = quantize_weight(w)
    s = w.abs().mean()
    assert tw.codes.dtype == torch.int8 and tw.codes.shape == (37, 53)
    assert set(tw.codes.unique().tolist()) == {-1, 0, 1}
    assert torch.equal(tw.scale, s)
    assert torch.equal(tw.codes, (w / s).round().clamp(-1, 1).to(torch.int8))
    assert torch.allclose(tw.dequantize(), tw.codes.float() * s)


def test_quantize_weight_of_zeros_stays_finite():
    tw = quantize_weight(torch.zeros(4, 8))
    assert tw.scale.item() == pytest.approx(1e-5)
    assert not tw.codes.any()


def test_quantize_weight_rounds_half_to_even():
    # mean |w| = 1, so w / s is exact: 0.5 ties to 0 (round half to even, as torch.round), 1.5 -> 2 -> 1
    tie = torch.tensor([[0.5, 1.5, -0.5, -1.5]])
    assert absmean_scale(tie).item() == 1.0
    assert quantize_weight(tie).codes.tolist() == [[0, 1, 0, -1]]


def test_weight_quant_matches_transformers(no_dynamo):
    bitnet = pytest.importorskip("transformers.integrations.bitnet")
    w = _randn(64, 96, seed=1)
    ours = fake_quantize_weight(w)
    theirs = bitnet.WeightQuant.apply(w)
    assert torch.allclose(ours, theirs, rtol=1e-6, atol=0)
    assert torch.equal(quantize_weight(w).codes.float(), (theirs / theirs.abs().max()).round())


def test_quantize_activations_per_token():
    x = _randn(3, 5, 40, seed=2)
    xq, a = quantize_activations(x)
    assert xq.dtype == torch.int8 and a.shape == (3, 5, 1)
    assert torch.equal(a, 127 / x.abs().amax(-1, keepdim=True))
    assert torch.equal(xq.abs().amax(-1), torch.full((3, 5), 127, dtype=torch.int8))  # the max hits ±127
    assert torch.equal(xq, (x * a).round().clamp(-128, 127).to(torch.int8))


def test_quantize_activations_per_tensor_and_zero_rows():
    x = _randn(4, 16, seed=3)
    x[1] = 0
    _, a = quantize_activations(x, per_token=False)
    assert a.shape == () and a.item() == pytest.approx(127 / x.abs().max().item())
    xq_tok, a_tok = quantize_activations(x)
    assert torch.isfinite(a_tok).all() and not xq_tok[1].any()


def test_activation_quant_matches_transformers(no_dynamo):
    bitnet = pytest.importorskip("transformers.integrations.bitnet")
    x = _randn(2, 7, 128, seed=4)
    layer = bitnet.BitLinear(128, 8, bias=False, dtype=torch.float32)
    theirs_q, theirs_scale = layer.activation_quant(x)
    ours_q, ours_a = quantize_activations(x)
    assert torch.equal(ours_q, theirs_q)
    assert torch.equal(ours_a, theirs_scale)
    assert torch.allclose(fake_quantize_activations(x), bitnet.ActQuant.apply(x), rtol=1e-6, atol=0)


def test_bf16_inputs_quantize_in_float32():
    x = _randn(3, 64, seed=5, dtype=torch.bfloat16)
    xq, a = quantize_activations(x)
    assert a.dtype == torch.float32
    assert torch.equal(xq, quantize_activations(x.float())[0])
    assert fake_quantize_weight(x).dtype == torch.bfloat16


def test_absmean_and_absmax_scales():
    w = _randn(8, 8, seed=6)
    assert torch.equal(absmean_scale(w), w.abs().mean())
    assert torch.equal(absmax_scale(w), 127 / w.abs().amax(-1, keepdim=True))


def test_ste_forward_is_quantized_and_backward_is_identity():
    w = _randn(16, 32, seed=7).requires_grad_()
    x = _randn(4, 32, seed=8).requires_grad_()
    qw, qx = ste_weight(w), ste_activations(x)
    # w + (q(w) - w) equals q(w) up to one float rounding
    assert torch.allclose(qw.detach(), fake_quantize_weight(w.detach()), rtol=0, atol=1e-6)
    assert torch.allclose(qx.detach(), fake_quantize_activations(x.detach()), rtol=0, atol=1e-6)
    g_w, g_x = _randn(16, 32, seed=9), _randn(4, 32, seed=10)
    (qw * g_w).sum().backward()
    (qx * g_x).sum().backward()
    assert torch.equal(w.grad, g_w) and torch.equal(x.grad, g_x)


def test_ste_strength_blends_from_identity():
    w = _randn(16, 32, seed=11)
    assert torch.equal(ste_weight(w, 0.0), w)
    half = ste_weight(w, 0.5)
    assert torch.allclose(half, (w + fake_quantize_weight(w)) / 2, atol=1e-6)


def test_ternary_weight_per_row_scale():
    tw = TernaryWeight(torch.tensor([[1, -1], [0, 1]], dtype=torch.int8), torch.tensor([2.0, 3.0]))
    assert tw.shape == (2, 2)
    assert torch.equal(tw.dequantize(), torch.tensor([[2.0, -2.0], [0.0, 3.0]]))

"""The fused Triton BitLinear training kernels against the torch straight-through path, run by Triton's
interpreter on CPU (TRITON_INTERPRET=1): codes bit-exact, outputs and gradients equal up to float rounding."""

from __future__ import annotations

import importlib
import os

import pytest
import torch

pytest.importorskip("triton")
os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are defined: set before importing them

from pybitnet.nn import BitLinear  # noqa: E402
from pybitnet.quant import quantize_activations, quantize_weight  # noqa: E402
from pybitnet.train import fused  # noqa: E402

fused = importlib.reload(fused)  # in case another test imported it without the interpreter


@pytest.mark.parametrize(("m", "k", "n"), [(37, 96, 50), (5, 200, 33)])
def test_quantizers_match_the_reference_bit_for_bit(m, k, n):
    torch.manual_seed(m)
    x = torch.randn(m, k) * torch.rand(m, 1) * 10
    x[0, :7] = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, 0.0, 3.0])  # ties round to even in both
    xq, inv = fused.quantize_rows(x)
    ref_q, ref_a = quantize_activations(x)
    assert torch.equal(xq, ref_q)
    torch.testing.assert_close(inv, 1.0 / ref_a.reshape(-1))
    w = torch.randn(n, k)
    codes, s = fused.ternarize(w)
    ref = quantize_weight(w)
    assert torch.equal(codes, ref.codes)
    assert torch.equal(s.reshape(()), ref.scale)


@pytest.mark.parametrize(("m", "k", "n"), [(37, 96, 50), (64, 64, 64)])
def test_fused_forward_and_backward_match_the_torch_path(m, k, n):
    torch.manual_seed(k)
    layer = BitLinear(k, n)
    x = torch.randn(2, m, k, requires_grad=True)
    y_ref = layer(x)
    y_ref.square().sum().backward()
    ref_grads = (x.grad.clone(), layer.weight.grad.clone())
    x.grad = layer.weight.grad = None
    y = fused.fused_bitlinear(x, layer.weight)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    y.square().sum().backward()
    torch.testing.assert_close(x.grad, ref_grads[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(layer.weight.grad, ref_grads[1], rtol=1e-4, atol=1e-4)


def test_fused_layer_swaps_in_place_and_falls_back_during_warmup():
    torch.manual_seed(0)
    model = torch.nn.Sequential(BitLinear(32, 16), BitLinear(16, 8))
    x = torch.randn(4, 32)
    expected = model(x)
    assert fused.use_fused_kernels(model) == 2
    assert isinstance(model[0], fused.FusedBitLinear)
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    model[0].quant_strength.fill_(0.5)
    fused.set_fused(model, False)  # λ < 1: the straight-through path blends
    torch.testing.assert_close(model[0](x), BitLinear.forward(model[0], x))
    assert not torch.allclose(model[0](x), expected_first := fused.fused_bitlinear(x, model[0].weight))
    assert expected_first.shape == (4, 16)

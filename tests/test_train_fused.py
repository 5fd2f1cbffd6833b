"""The fused Triton BitLinear training kernels against the torch straight-through path, run by Triton's
interpreter on CPU (TRITON_INTERPRET=1): the int8 GEMM integer-exact, outputs and gradients equal to the
straight-through path up to float rounding."""

from __future__ import annotations

import importlib
import os

import pytest
import torch

pytest.importorskip("triton")
os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are defined: set before importing them

from pybitnet.kernels.reference import ternary_matmul_int
from pybitnet.nn import BitLinear
from pybitnet.train import fused

fused = importlib.reload(fused)  # in case another test imported it without the interpreter


@pytest.mark.parametrize(("m", "k", "n"), [(37, 96, 50), (5, 200, 33), (64, 64, 64)])
def test_int8_gemm_is_integer_exact(m, k, n):
    torch.manual_seed(m)
    xq = torch.randint(-128, 128, (m, k), dtype=torch.int8)
    codes = torch.randint(-1, 2, (n, k), dtype=torch.int8)
    got = fused.int8_matmul(xq, codes, torch.ones(m), torch.float32)
    assert torch.equal(got, ternary_matmul_int(xq, codes).float())  # |acc| < 2**24: exact in float32
    scale = torch.rand(m) + 0.5
    torch.testing.assert_close(fused.int8_matmul(xq, codes, scale, torch.float32), got * scale[:, None])


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


def test_fused_layer_compiles_to_one_graph():
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = BitLinear(64, 32)
    fused.use_fused_kernels(layer)
    x = torch.randn(3, 64, requires_grad=True)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    y = compiled(x)
    y.sum().backward()
    torch.testing.assert_close(y, BitLinear.forward(layer, x.detach()), rtol=1e-5, atol=1e-5)
    assert layer.weight.grad is not None and x.grad is not None

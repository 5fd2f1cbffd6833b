"""BitLinear: the training form (latent weights + STE), the packed inference form, and conversions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pybitnet.nn import BitLinear, PackedBitLinear, RMSNorm
from pybitnet.quant import TernaryWeight, fake_quantize_activations, fake_quantize_weight


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _layer(cols=48, out=20, seed=0, **kwargs) -> BitLinear:
    torch.manual_seed(seed)
    return BitLinear(cols, out, **kwargs)


def test_is_a_drop_in_for_nn_linear():
    dense = nn.Linear(48, 20)
    layer = BitLinear(48, 20, bias=True)
    layer.load_state_dict(dense.state_dict())
    assert isinstance(layer, nn.Linear)
    assert set(layer.state_dict()) == {"weight", "bias"}
    assert layer(torch.randn(3, 48)).shape == (3, 20)


def test_forward_quantizes_weights_and_activations():
    layer = _layer()
    x = torch.randn(2, 5, 48, generator=_gen(1))
    expected = F.linear(fake_quantize_activations(x), fake_quantize_weight(layer.weight.detach()))
    assert torch.allclose(layer(x), expected, rtol=1e-5, atol=1e-6)


def test_straight_through_gradients_flow_as_identity():
    """d/dW and d/dx are those of a plain linear at the quantized values (the STE is the identity)."""
    layer = _layer(bias=True)
    x = torch.randn(4, 48, generator=_gen(2), requires_grad=True)
    grad_out = torch.randn(4, 20, generator=_gen(3))
    layer(x).backward(grad_out)
    qx = fake_quantize_activations(x.detach())
    qw = fake_quantize_weight(layer.weight.detach())
    assert torch.allclose(layer.weight.grad, grad_out.T @ qx, rtol=1e-5, atol=1e-6)
    assert torch.allclose(x.grad, grad_out @ qw, rtol=1e-5, atol=1e-6)
    assert torch.allclose(layer.bias.grad, grad_out.sum(0))
    assert layer.weight.grad.abs().sum() > 0


def test_training_steps_change_the_latent_weights():
    layer = _layer()
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    x, target = torch.randn(16, 48, generator=_gen(4)), torch.randn(16, 20, generator=_gen(5))
    before = layer.weight.detach().clone()
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = F.mse_loss(layer(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert not torch.equal(layer.weight, before)
    assert losses[-1] < losses[0]


def test_quant_strength_zero_is_a_plain_linear():
    layer = _layer()
    layer.quant_strength.fill_(0.0)
    if hasattr(layer, "act_quant_strength"):
        layer.act_quant_strength.fill_(0.0)
    x = torch.randn(3, 48, generator=_gen(6))
    assert torch.allclose(layer(x), F.linear(x, layer.weight), atol=1e-6)


@pytest.mark.parametrize("input_norm", [False, True])
def test_to_packed_computes_the_same(input_norm):
    layer = _layer(input_norm=input_norm)
    if input_norm:
        with torch.no_grad():
            layer.input_norm.weight.uniform_(0.5, 1.5)
    packed = layer.to_packed("reference")
    assert isinstance(packed, PackedBitLinear) and packed.kernel.name == "reference"
    x = torch.randn(2, 7, 48, generator=_gen(7))
    with torch.no_grad():
        assert torch.allclose(packed(x), layer(x), rtol=1e-5, atol=1e-5)
    tw = packed.ternary()
    assert torch.equal(tw.codes, layer.ternary().codes) and torch.equal(tw.scale, layer.ternary().scale)


def test_packed_to_latent_and_back_is_exact():
    codes = torch.randint(-1, 2, (20, 48), generator=_gen(8), dtype=torch.int8)
    packed = PackedBitLinear.from_ternary(TernaryWeight(codes, torch.tensor(0.07)), _kernel())
    latent = packed.to_latent()
    assert isinstance(latent, BitLinear) and latent.weight.requires_grad
    x = torch.randn(3, 48, generator=_gen(9))
    with torch.no_grad():
        assert torch.allclose(latent(x), packed(x), rtol=1e-5, atol=1e-6)
    again = latent.to_packed("reference").ternary()
    assert torch.equal(again.codes, codes)
    assert again.scale.item() == pytest.approx(0.07, rel=1e-6)


def test_packed_to_latent_keeps_the_input_norm_and_bias():
    norm = RMSNorm(16)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    codes = torch.randint(-1, 2, (8, 16), generator=_gen(10), dtype=torch.int8)
    packed = PackedBitLinear.from_ternary(
        TernaryWeight(codes, torch.tensor(0.3)), _kernel(), bias=torch.arange(8.0), input_norm=norm
    )
    latent = packed.to_latent()
    x = torch.randn(2, 16, generator=_gen(11))
    with torch.no_grad():
        assert torch.allclose(latent(x), packed(x), rtol=1e-5, atol=1e-5)


def test_packed_layer_keeps_a_float32_scale_under_dtype_casts():
    layer = _layer().to_packed("reference").to(torch.bfloat16)
    assert layer.scale.dtype == torch.float32
    assert layer(torch.randn(2, 48).bfloat16()).dtype == torch.bfloat16


def _kernel():
    from pybitnet.kernels import get_kernel

    return get_kernel("reference")

"""The int8 BitLinear training path against the torch straight-through (fake-quant) path: the int8 GEMM
integer-exact, the forward equal to the integer reference product, gradients equal to the straight-through
path up to float rounding ("bf16" grad_x) or to the rounding of the output gradient to int8 ("int8" grad_x,
itself integer-exact). On the GPU when there is one, else in Triton's CPU interpreter (TRITON_INTERPRET=1)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (as tests/conftest.py)
pytest.importorskip("triton")

from pybitnet.errors import ConfigError
from pybitnet.kernels.reference import ternary_matmul_int
from pybitnet.nn import BitLinear
from pybitnet.quant import quantize_activations, quantize_weight
from pybitnet.train import fused

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize(("m", "k", "n"), [(37, 96, 50), (5, 200, 33), (64, 64, 64)])
def test_int8_gemm_is_integer_exact(m, k, n):
    torch.manual_seed(m)
    xq = torch.randint(-128, 128, (m, k), dtype=torch.int8, device=DEVICE)
    codes = torch.randint(-1, 2, (n, k), dtype=torch.int8, device=DEVICE)
    one = torch.ones(1, device=DEVICE)
    got = fused.int8_matmul(xq, codes, torch.ones(m, device=DEVICE), one, torch.float32)
    assert torch.equal(got, ternary_matmul_int(xq, codes).float())  # |acc| < 2**24: exact in float32
    a, s = torch.rand(m, device=DEVICE) + 0.5, torch.rand(n, device=DEVICE) + 0.5
    # the epilogue rounds as the reference's acc * (s / a): the quotient, then the product
    assert torch.equal(fused.int8_matmul(xq, codes, a, s, torch.float32), got * (s[None, :] / a[:, None]))


def test_int8_gemm_falls_back_to_torch_int_mm_on_cpu_without_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    torch.manual_seed(1)
    xq = torch.randint(-128, 128, (19, 40), dtype=torch.int8)
    codes = torch.randint(-1, 2, (24, 40), dtype=torch.int8)
    got = fused.int8_matmul(xq, codes, torch.ones(19), torch.ones(1), torch.float32)
    assert torch.equal(got, ternary_matmul_int(xq, codes).float())


def reference_step(layer: BitLinear, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = x.detach().requires_grad_()
    layer.weight.grad = None
    y = layer(x)
    y.square().sum().backward()
    return y.detach(), x.grad, layer.weight.grad


def fused_step(layer: BitLinear, x: torch.Tensor, mode: str, forward=None):
    x = x.detach().requires_grad_()
    layer.weight.grad = None
    y = fused.fused_bitlinear(x, layer.weight, grad_x_mode=mode) if forward is None else forward(x)
    y.square().sum().backward()
    return y.detach(), x.grad, layer.weight.grad


@pytest.mark.parametrize(("m", "k", "n"), [(37, 96, 50), (64, 64, 64)])
def test_forward_is_the_integer_product_and_bf16_mode_gradients_match_the_torch_path(m, k, n):
    torch.manual_seed(k)
    layer = BitLinear(k, n).to(DEVICE)
    x = torch.randn(2, m, k, device=DEVICE)
    y_ref, gx_ref, gw_ref = reference_step(layer, x)
    y, gx, gw = fused_step(layer, x, "bf16")
    xq, a = quantize_activations(x.reshape(-1, k))
    tw = quantize_weight(layer.weight.detach())
    exact = ternary_matmul_int(xq, tw.codes).float() * (tw.scale / a)
    assert torch.equal(y.reshape(-1, n), exact)  # the epilogue is the one float multiply after int32 sums
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-4, atol=1e-4)


def test_int8_grad_x_mode_rounds_only_the_output_gradient():
    torch.manual_seed(3)
    layer = BitLinear(96, 72).to(DEVICE)
    x = torch.randn(3, 41, 96, device=DEVICE)
    _, gx_ref, gw_ref = reference_step(layer, x)
    y, gx, gw = fused_step(layer, x, "int8")
    torch.testing.assert_close(gw, gw_ref, rtol=1e-4, atol=1e-4)  # weight gradients keep float g
    tw = quantize_weight(layer.weight.detach())
    gq, ag = quantize_activations(2 * y.reshape(-1, 72) * tw.scale)  # g = d(sum y^2)/dy, times s
    exact = ternary_matmul_int(gq, tw.codes.t().contiguous()).float() * (1 / ag)
    torch.testing.assert_close(gx.reshape(-1, 96), exact, rtol=1e-6, atol=1e-6)
    assert 1e-5 < rel(gx, gx_ref) < 2e-2  # 8-bit rounding of g: small, but not nothing


def test_fused_layer_swaps_in_place_and_falls_back_during_warmup():
    torch.manual_seed(0)
    model = torch.nn.Sequential(BitLinear(32, 16), BitLinear(16, 8))
    x = torch.randn(4, 32)
    expected = model(x)
    assert fused.use_fused_kernels(model, grad_x_mode="int8") == 2
    assert isinstance(model[0], fused.FusedBitLinear) and model[1].grad_x_mode == "int8"
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    model[0].quant_strength.fill_(0.5)
    fused.set_fused(model, False)  # λ < 1: the straight-through path blends
    torch.testing.assert_close(model[0](x), BitLinear.forward(model[0], x))
    assert not torch.allclose(model[0](x), fused.fused_bitlinear(x, model[0].weight))


def test_stacked_product_rejects_no_weights_or_other_widths():
    x = torch.randn(3, 8)
    for weights in ([], [torch.randn(4, 8), torch.randn(4, 6)]):
        with pytest.raises(ValueError, match=r"\[N, 8\] matrices"):
            fused.fused_bitlinear_many(x, weights, "bf16")


def test_unknown_grad_x_mode_is_a_config_error():
    with pytest.raises(ConfigError, match="grad_x_mode"):
        fused.use_fused_kernels(BitLinear(8, 8), grad_x_mode="fp4")
    with pytest.raises(ConfigError, match="grad_x_mode"):
        fused.fused_bitlinear(torch.randn(2, 8), torch.randn(8, 8), grad_x_mode="fp4")


@pytest.mark.parametrize("mode", ["bf16", "int8"])
def test_fused_layer_compiles_to_one_graph_with_its_backward(mode):
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = BitLinear(64, 32).to(DEVICE)
    fused.use_fused_kernels(layer, grad_x_mode=mode)
    x = torch.randn(3, 64, device=DEVICE)
    eager = fused_step(layer, x, mode, layer)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)  # a graph break would raise
    got = fused_step(layer, x, mode, compiled)
    for e, c in zip(eager, got, strict=True):
        torch.testing.assert_close(c, e, rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["bf16", "int8"])
def test_cuda_inductor_bf16_autocast_matches_the_torch_path(mode):
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = BitLinear(512, 384).cuda()
    x = torch.randn(4, 100, 512, device="cuda")

    def run(forward):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return fused_step(layer, x, mode, forward)

    ref = run(layer)
    fused.use_fused_kernels(layer, grad_x_mode=mode)
    got = run(torch.compile(layer, fullgraph=True))
    assert got[0].dtype == torch.bfloat16
    tolerance = {"bf16": 1e-2, "int8": 3e-2}[mode]  # bf16 outputs and GEMMs; int8: g rounded too
    for g, r, tol in zip(got, ref, (1e-2, tolerance, 1e-2), strict=True):
        assert rel(g.float(), r.float()) < tol


@pytest.mark.parametrize("mode", ["bf16", "int8"])
def test_layers_sharing_an_input_run_as_one_stacked_product(mode):
    """q/k/v-like layers (different widths and scales) through nn.fused_linears: one product on the stacked
    codes gives each layer's own output bit for bit, and the gradients of the separate layers (summed
    in another order: float rounding; in int8 mode g is quantized over the stacked row). Layers of equal
    widths keep separate products."""
    from pybitnet.nn.bitlinear import fused_linears

    torch.manual_seed(7)
    layers = [BitLinear(96, n).to(DEVICE) for n in (64, 16, 16)]
    with torch.no_grad():
        layers[1].weight.mul_(3.0)  # a scale of its own
    x = torch.randn(2, 29, 96, device=DEVICE)

    def run(forward):
        xg = x.detach().requires_grad_()
        for m in layers:
            m.weight.grad = None
        ys = forward(xg)
        sum(y.square().sum() for y in ys).backward()
        return [y.detach() for y in ys], xg.grad, [m.weight.grad for m in layers]

    separate = run(lambda xg: [fused.fused_bitlinear(xg, m.weight, grad_x_mode=mode) for m in layers])
    fused.use_fused_kernels(torch.nn.ModuleList(layers), grad_x_mode=mode)
    calls = []
    many = fused.fused_bitlinear_many
    fused.fused_bitlinear_many = lambda *a: calls.append(len(a[1])) or many(*a)
    try:
        stacked = run(lambda xg: fused_linears(xg, layers))
        fused_linears(x, layers[1:])  # equal widths (as gate/up): separate products
    finally:
        fused.fused_bitlinear_many = many
    assert calls == [3, 1, 1]  # the stacked q/k/v-like product, then the two equal layers one by one
    for ys, yf in zip(stacked[0], separate[0], strict=True):
        assert torch.equal(ys, yf)
    assert rel(stacked[1], separate[1]) < (1e-5 if mode == "bf16" else 2e-2)
    for gs, gf in zip(stacked[2], separate[2], strict=True):
        torch.testing.assert_close(gs, gf, rtol=1e-5, atol=1e-5)

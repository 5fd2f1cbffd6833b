"""The reference kernel is integer-exact: its accumulation equals an exact float64/int64 computation."""

from __future__ import annotations

import pytest
import torch

from pybitnet.errors import LayoutError
from pybitnet.kernels import get_kernel
from pybitnet.kernels.reference import (
    MAX_EXACT_FP32_K,
    packed_matmul_int,
    reference_linear,
    ternary_matmul_int,
)
from pybitnet.quant import PackedWeight, TernaryWeight, pack, quantize_activations
from pybitnet.quant.layouts.hf import pack_rows


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _codes(out: int, cols: int, seed: int) -> torch.Tensor:
    return torch.randint(-1, 2, (out, cols), generator=_gen(seed), dtype=torch.int8)


def _exact(xq: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """float64 is exact for these integers (|sum| < 2**53); int64 for small shapes agrees (checked below)."""
    return (xq.double() @ codes.double().T).to(torch.int64)


# [out, in]: the 1bitLLM-3B FFN (3200 x 8640 and back), bitnet_b1_58-large's FFN, odd and tiny sizes
SHAPES = [
    (3200, 8640),
    (8640, 3200),
    (1536, 4096),
    (4096, 1536),
    (1, 1),
    (3, 5),
    (7, 13),
    (257, 129),
    (1001, 999),
]


@pytest.mark.parametrize(("out", "cols"), SHAPES)
def test_accumulation_is_integer_exact(out, cols):
    codes = _codes(out, cols, out * 7 + cols)
    xq = torch.randint(-128, 128, (3, cols), generator=_gen(cols), dtype=torch.int8)
    expected = _exact(xq, codes)
    assert torch.equal(packed_matmul_int(xq, pack_rows(codes), out).long(), expected)
    assert torch.equal(ternary_matmul_int(xq, codes).long(), expected)


@pytest.mark.parametrize(("out", "cols"), [(5, 7), (33, 64), (6, 130)])
def test_float64_reference_agrees_with_int64(out, cols):
    codes = _codes(out, cols, 1)
    xq = torch.randint(-128, 128, (4, cols), generator=_gen(2), dtype=torch.int8)
    assert torch.equal(_exact(xq, codes), xq.long() @ codes.long().T)


@pytest.mark.parametrize("value", [127, -127, -128])
def test_saturated_activations_worst_case_sums(value):
    """Every activation at the int8 limit times uniform codes: the largest sums a layer this wide sees."""
    cols, out = 8640, 12
    codes = torch.ones((out, cols), dtype=torch.int8)
    codes[1::2] = -1
    codes[2] = 0
    xq = torch.full((2, cols), value, dtype=torch.int8)
    got = packed_matmul_int(xq, pack_rows(codes), out)
    assert got[0, 0].item() == value * cols and got[0, 1].item() == -value * cols and got[0, 2].item() == 0
    assert torch.equal(got.long(), _exact(xq, codes))


def test_long_rows_fall_back_to_float64():
    cols = MAX_EXACT_FP32_K + 3  # past float32's exact range for 2-bit codes
    codes = _codes(3, cols, 3)
    xq = torch.full((1, cols), 127, dtype=torch.int8)
    assert torch.equal(packed_matmul_int(xq, pack_rows(codes), 3).long(), _exact(xq, codes))


@pytest.mark.parametrize(("out", "cols"), [(1536, 4096), (7, 13), (250, 3200)])
@pytest.mark.parametrize("layout", ["hf", "hf_inv"])
def test_linear_equals_float64_formula(out, cols, layout):
    """y = (xq @ Wt.T) * s / a: integer part exact, then one float32 multiply per element."""
    tw = TernaryWeight(_codes(out, cols, 4), torch.tensor(0.0371))
    pw = get_kernel("reference").prepare(pack(tw, layout))  # either convention arrives as "hf"
    assert pw.layout == "hf"
    x = torch.randn(2, 5, cols, generator=_gen(5))
    x[0, 0, 0] = 40.0  # an outlier: every other activation of that token rounds to few levels
    y = reference_linear(x, pw)
    xq, a = quantize_activations(x)
    expected = _exact(xq, tw.codes).double() * 0.0371 / a.double()
    assert y.dtype == torch.float32 and y.shape == (2, 5, out)
    assert torch.allclose(y.double(), expected, rtol=1e-6, atol=1e-6 * expected.abs().max().item())


def test_output_follows_input_dtype_and_per_row_scales():
    tw = TernaryWeight(_codes(6, 16, 6), torch.arange(1, 7, dtype=torch.float32) / 10)
    pw = pack(tw, "hf")
    x = torch.randn(3, 16, generator=_gen(7))
    y = reference_linear(x, pw)
    xq, a = quantize_activations(x)
    assert torch.allclose(y, (xq.float() @ tw.codes.float().T) * tw.scale / a, rtol=1e-6)
    assert reference_linear(x.bfloat16(), pw).dtype == torch.bfloat16


def test_rejects_weights_in_another_layout():
    pw = pack(TernaryWeight(_codes(8, 8, 8), torch.tensor(1.0)), "hf")
    with pytest.raises(LayoutError, match=r"HF packed uint8 \[2, 8\]"):
        reference_linear(torch.randn(1, 8), PackedWeight("hf", pw.data[:1], pw.scale, pw.shape))
    with pytest.raises(LayoutError, match="input has 7 features but the weight expects 8"):
        reference_linear(torch.randn(1, 7), pw)

"""The HF packed layout (both weight_scale conventions): round trips, bits equal transformers', errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pybitnet.errors import LayoutError
from pybitnet.quant import PackedWeight, TernaryWeight, get_layout, list_layouts, pack, repack, unpack
from pybitnet.quant.layouts.hf import pack_rows, unpack_rows


def _codes(out: int, cols: int, seed: int) -> torch.Tensor:
    return torch.randint(-1, 2, (out, cols), generator=torch.Generator().manual_seed(seed), dtype=torch.int8)


@settings(max_examples=60, deadline=None)
@given(
    out=st.integers(1, 67),
    cols=st.integers(1, 40),
    seed=st.integers(0, 2**31 - 1),
    scale=st.floats(1e-4, 10.0),
    layout=st.sampled_from(["hf", "hf_inv"]),
)
def test_round_trip_any_shape(out, cols, seed, scale, layout):
    """Including out_features that are not a multiple of 4 (the last row block is padded)."""
    tw = TernaryWeight(_codes(out, cols, seed), torch.tensor(scale))
    pw = pack(tw, layout)
    assert pw.data.dtype == torch.uint8 and tuple(pw.data.shape) == (-(-out // 4), cols)
    assert pw.layout == layout and pw.shape == (out, cols)
    back = unpack(pw)
    assert torch.equal(back.codes, tw.codes)
    assert back.scale.shape == () and back.scale.item() == pytest.approx(scale, rel=1e-6)


@settings(max_examples=30, deadline=None)
@given(out=st.integers(1, 40), cols=st.integers(1, 24), seed=st.integers(0, 2**31 - 1))
def test_bits_equal_transformers_pack_weights(out, cols, seed):
    """Bit-exact where transformers can load the result (out % 4 == 0). Past the last row, transformers pads
    with code 0 (weight -1) and we pad with code 1 (weight 0): the valid rows still read back the same."""
    bitnet = pytest.importorskip("transformers.integrations.bitnet")
    codes = _codes(out, cols, seed)
    theirs = bitnet.pack_weights(codes.clone())
    if out % 4 == 0:
        assert torch.equal(pack_rows(codes), theirs)
    assert torch.equal(unpack_rows(theirs, out), codes)
    padding = unpack_rows(pack_rows(codes), -(-out // 4) * 4)[out:]
    assert padding.shape == ((-out) % 4, cols) and not padding.any()


@pytest.mark.parametrize("out", [4, 8, 44, 128])
def test_unpack_equals_transformers_unpack_weights(no_dynamo, out):
    bitnet = pytest.importorskip("transformers.integrations.bitnet")
    packed = pack_rows(_codes(out, 24, out))
    assert torch.equal(unpack_rows(packed, out).float(), bitnet.unpack_weights(packed, dtype=torch.float32))


def test_documented_example_from_transformers():
    packed = torch.tensor([[0b10100001, 0b00011000], [0b10010000, 0b00001010]], dtype=torch.uint8)
    expected = [[0, -1], [-1, 1], [-1, 1], [-1, 1], [1, 0], [0, -1], [1, -1], [1, -1]]
    assert unpack_rows(packed, 8).tolist() == expected
    assert torch.equal(pack_rows(torch.tensor(expected, dtype=torch.int8)), packed)


def test_scale_conventions():
    tw = TernaryWeight(_codes(6, 5, 1), torch.tensor(0.25))
    auto, inv = pack(tw, "hf"), pack(tw, "hf_inv")
    assert auto.scale.tolist() == [0.25]  # autobitlinear: real = codes * weight_scale
    assert inv.scale.tolist() == [4.0]  # bitlinear: real = codes / weight_scale
    assert torch.equal(auto.data, inv.data)


def test_conventions_convert_without_touching_the_bits():
    pw = pack(TernaryWeight(_codes(9, 7, 2), torch.tensor(0.5)), "hf_inv")
    hf = repack(pw, "hf")
    assert hf.layout == "hf" and hf.data is pw.data  # no unpacking, no copy (a memory-mapped tensor stays so)
    assert hf.scale.tolist() == [0.5]
    assert repack(hf, "hf") is hf


def test_per_row_scales_round_trip():
    tw = TernaryWeight(_codes(5, 3, 3), torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]))
    back = unpack(pack(tw, "hf"))
    assert torch.equal(back.codes, tw.codes) and torch.equal(back.scale, tw.scale)


def test_non_contiguous_codes_pack_like_contiguous():
    codes = _codes(12, 10, 4)
    assert torch.equal(pack_rows(codes.T.contiguous().T), pack_rows(codes))
    assert torch.equal(pack_rows(codes.T), pack_rows(codes.T.contiguous()))


def test_errors_name_the_expected_shape():
    with pytest.raises(LayoutError, match=r"uint8 \[3, in\]"):
        unpack_rows(torch.zeros(2, 4, dtype=torch.uint8), 9)
    with pytest.raises(LayoutError, match="uint8"):
        unpack_rows(torch.zeros(3, 4, dtype=torch.int8), 9)
    with pytest.raises(LayoutError, match="2-D"):
        pack(TernaryWeight(torch.zeros(4, dtype=torch.int8), torch.tensor(1.0)), "hf")
    with pytest.raises(LayoutError, match="per tensor or per output row"):
        pack(TernaryWeight(torch.zeros(4, 2, dtype=torch.int8), torch.ones(3)), "hf")
    with pytest.raises(LayoutError, match=r"unknown layout 'nope'; known layouts: .*hf"):
        unpack(PackedWeight("nope", torch.zeros(1, dtype=torch.uint8), torch.ones(1), (1, 1)))


def test_registry_lists_both_conventions():
    names = {layout.name for layout in list_layouts()}
    assert {"hf", "hf_inv"} <= names
    assert get_layout("hf").bits_per_weight == 2.0

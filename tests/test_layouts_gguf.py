"""GGUF ternary layouts: TQ2_0 / TQ1_0 bit-exact with the gguf package's quants.py, I2_S against an
independent implementation of bitnet.cpp's x86 layout written out below, round trips and errors."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize
from hypothesis import given, settings
from hypothesis import strategies as st

from pybitnet.errors import LayoutError
from pybitnet.quant import TernaryWeight, get_layout, pack, repack, unpack
from pybitnet.quant.layouts.gguf_tq import unpack_tq_bytes
from pybitnet.quant.layouts.i2s import unpack_i2s_bytes

QTYPES = {"tq2_0": GGMLQuantizationType.TQ2_0, "tq1_0": GGMLQuantizationType.TQ1_0}
SETTINGS = settings(max_examples=40, deadline=None)


def random_codes(seed: int, out: int, cols: int, p_zero: float) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    signs = rng.choice(np.array([-1, 1], dtype=np.int8), size=(out, cols))
    return torch.from_numpy(np.where(rng.random((out, cols)) < p_zero, 0, signs).astype(np.int8))


@st.composite
def ternary_weights(draw, col_unit: int = 256, max_units: int = 3, per_row: bool = True) -> TernaryWeight:
    """Random ternary weights: out_features 1..9 (often not a multiple of 4), in_features a multiple of
    `col_unit`, zero fractions from none to all, per-tensor or per-row scales."""
    out = draw(st.integers(1, 9))
    cols = col_unit * draw(st.integers(1, max_units))
    codes = random_codes(
        draw(st.integers(0, 2**32 - 1)), out, cols, draw(st.sampled_from([0.0, 0.3, 0.9, 1.0]))
    )
    scale_values = st.floats(1e-3, 50.0, allow_nan=False, allow_infinity=False)
    if per_row and draw(st.booleans()):
        scale = torch.tensor(draw(st.lists(scale_values, min_size=out, max_size=out)), dtype=torch.float32)
    else:
        scale = torch.tensor(draw(scale_values), dtype=torch.float32)
    return TernaryWeight(codes, scale)


@pytest.mark.parametrize("layout", ["tq2_0", "tq1_0"])
@SETTINGS
@given(tw=ternary_weights())
def test_tq_pack_is_bit_exact_with_gguf_quantize(layout, tw):
    ours = pack(tw, layout)
    theirs = quantize(tw.dequantize().numpy(), QTYPES[layout])
    assert ours.data.dtype == torch.uint8
    np.testing.assert_array_equal(ours.data.numpy(), theirs)


@pytest.mark.parametrize("layout", ["tq2_0", "tq1_0"])
@SETTINGS
@given(tw=ternary_weights())
def test_tq_unpack_equals_gguf_dequantize_and_round_trips(layout, tw):
    raw = quantize(tw.dequantize().numpy(), QTYPES[layout])
    back = unpack_tq_bytes(torch.from_numpy(raw), tw.shape, layout)
    np.testing.assert_array_equal(back.dequantize().numpy(), dequantize(raw, QTYPES[layout]))
    # codes survive exactly; the scale is the fp16-rounded one, per tensor when all rows share it
    used = tw.codes.ne(0).any(1)
    assert torch.equal(back.codes, tw.codes)
    expected = tw.scale.expand(tw.shape[0]).to(torch.float16).float()
    assert torch.equal(back.scale.expand(tw.shape[0])[used], expected[used])
    packed = pack(back, layout)
    np.testing.assert_array_equal(packed.data.numpy(), raw)
    assert torch.equal(packed.scale, back.scale.reshape(-1))
    assert torch.equal(unpack(packed).codes, tw.codes)


@pytest.mark.parametrize("layout", ["tq2_0", "tq1_0"])
def test_tq_converts_to_other_layouts_through_the_canonical_form(layout):
    tw = TernaryWeight(random_codes(1, 6, 512, 0.3), torch.tensor(0.125))
    hf = repack(pack(tw, layout), "hf")
    assert torch.equal(unpack(hf).codes, tw.codes)
    assert unpack(hf).scale.item() == 0.125
    assert get_layout(layout).bits_per_weight == {"tq2_0": 2.0625, "tq1_0": 1.6875}[layout]


@pytest.mark.parametrize("layout", ["tq2_0", "tq1_0"])
@pytest.mark.parametrize("cols", [100, 128, 384, 2560 + 64])
def test_tq_rejects_in_features_not_a_multiple_of_256(layout, cols):
    tw = TernaryWeight(torch.zeros((3, cols), dtype=torch.int8), torch.tensor(1.0))
    with pytest.raises(LayoutError, match=f"multiple of 256, got {cols}"):
        pack(tw, layout)


@pytest.mark.parametrize("layout", ["tq2_0", "tq1_0"])
def test_tq_rejects_blocks_with_different_scales_in_a_row(layout):
    # what llama.cpp's converter makes from non-ternary (latent) floats: every block its own absmax
    floats = np.random.default_rng(0).standard_normal((2, 512)).astype(np.float32)
    raw = quantize(floats, QTYPES[layout])
    with pytest.raises(LayoutError, match="different scales"):
        unpack_tq_bytes(torch.from_numpy(raw), (2, 512), layout)


def test_tq_block_with_zero_scale_dequantizes_to_zero():
    tw = TernaryWeight(random_codes(2, 2, 512, 0.0), torch.tensor(0.5))
    raw = pack(tw, "tq2_0").data.clone()
    raw[0, 64:66] = 0  # first block of row 0: scale 0, codes still nonzero
    back = unpack_tq_bytes(raw, (2, 512), "tq2_0")
    expected = dequantize(raw.numpy(), GGMLQuantizationType.TQ2_0)
    np.testing.assert_array_equal(back.dequantize().numpy(), expected)


def test_tq_errors_on_bad_bytes_and_scales():
    tw = TernaryWeight(random_codes(3, 2, 256, 0.0), torch.tensor(1.0))
    raw = pack(tw, "tq2_0").data.clone()
    with pytest.raises(LayoutError, match="must be 132 uint8 bytes"):
        unpack_tq_bytes(raw[:, :-1], (2, 256), "tq2_0")
    raw[0, 0] = 0xFF  # code 3
    with pytest.raises(LayoutError, match="code 3"):
        unpack_tq_bytes(raw, (2, 256), "tq2_0")
    raw = pack(tw, "tq1_0").data.clone()
    raw[1, -2:] = torch.tensor([0x00, 0x7C], dtype=torch.uint8)  # fp16 +inf
    with pytest.raises(LayoutError, match="not a finite"):
        unpack_tq_bytes(raw, (2, 256), "tq1_0")
    with pytest.raises(LayoutError, match="fp16"):
        pack(TernaryWeight(tw.codes, torch.tensor(1e6)), "tq2_0")


def i2s_reference(codes: np.ndarray, scale: float) -> bytes:
    """bitnet.cpp's x86 I2_S bytes, element by element as its quantize_i2_s loop writes them: flattened
    row-major, element j of 128-value block i into byte i*32 + j%32 at bit shift 6 - 2*(j//32), then the
    float32 scale and padding to 32 bytes."""
    flat = codes.reshape(-1).astype(np.int64) + 1
    out = bytearray(flat.size // 4)
    for i, q in enumerate(flat):
        block, j = divmod(i, 128)
        out[block * 32 + j % 32] |= int(q) << (6 - 2 * (j // 32))
    return bytes(out) + struct.pack("<f", scale) + bytes(28)


@SETTINGS
@given(tw=ternary_weights(col_unit=128, max_units=4, per_row=False))
def test_i2s_matches_an_independent_implementation_of_the_spec(tw):
    packed = pack(tw, "i2s")
    assert packed.data.numpy().tobytes() == i2s_reference(tw.codes.numpy(), tw.scale.item())
    assert torch.equal(packed.scale, tw.scale.reshape(1))
    back = unpack(packed)
    assert torch.equal(back.codes, tw.codes)
    assert back.scale.item() == tw.scale.item()


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), shape=st.sampled_from([(2, 64), (4, 96), (1, 384), (3, 128), (8, 16)]))
def test_i2s_flattens_across_rows(seed, shape):
    codes = random_codes(seed, *shape, 0.3)
    raw = torch.frombuffer(bytearray(i2s_reference(codes.numpy(), 0.75)), dtype=torch.uint8)
    back = unpack_i2s_bytes(raw, shape)
    assert torch.equal(back.codes, codes)
    assert back.scale.item() == 0.75


def test_i2s_errors():
    with pytest.raises(LayoutError, match="multiple of 128"):
        pack(TernaryWeight(torch.zeros((3, 100), dtype=torch.int8), torch.tensor(1.0)), "i2s")
    with pytest.raises(LayoutError, match="one scale per tensor"):
        pack(TernaryWeight(torch.zeros((2, 128), dtype=torch.int8), torch.tensor([1.0, 2.0])), "i2s")
    raw = pack(TernaryWeight(torch.zeros((2, 128), dtype=torch.int8), torch.tensor(1.0)), "i2s").data.clone()
    with pytest.raises(LayoutError, match="must be 96 uint8 bytes"):
        unpack_i2s_bytes(raw[:-1], (2, 128))
    raw[5] = 0b11000000
    with pytest.raises(LayoutError, match="code 3"):
        unpack_i2s_bytes(raw, (2, 128))
    raw[5] = 0b01010101
    raw[64:68] = torch.frombuffer(bytearray(struct.pack("<f", float("nan"))), dtype=torch.uint8)
    with pytest.raises(LayoutError, match="not a finite"):
        unpack_i2s_bytes(raw, (2, 128))


def test_negative_scales_move_their_sign_into_the_codes():
    tw = TernaryWeight(random_codes(4, 2, 256, 0.3), torch.tensor(-0.5))
    for layout in ("tq2_0", "tq1_0", "i2s"):
        back = unpack(pack(tw, layout))
        assert torch.equal(back.dequantize(), tw.dequantize())
        assert back.scale.item() == 0.5

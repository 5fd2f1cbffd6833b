"""HF packed layout (transformers' quant_method "bitnet").

uint8 [ceil(out/4), in]; codes w+1 in {0,1,2}; bits 2i..2i+1 of packed row r hold original row
i*ceil(out/4)+r.
Two scale conventions share the bits: "hf" (linear_class autobitlinear, real = codes * weight_scale) and
"hf_inv" (linear_class bitlinear, real = codes / weight_scale).
"""

from __future__ import annotations

import torch

from ...errors import LayoutError
from ..ternary import TernaryWeight
from .registry import Layout, PackedWeight, check_codes, register_direct_conversion, register_layout


def pack_rows(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes [out, in] -> uint8 [ceil(out/4), in] in four row blocks."""
    out, cols = codes.shape
    rows = -(-out // 4)
    u = (codes.to(torch.int8).view(torch.uint8) + 1).contiguous()  # -1, 0, 1 -> 0, 1, 2 (255 + 1 wraps to 0)
    if rows * 4 != out:  # pad with code 1 (= weight 0)
        u = torch.cat((u, torch.ones((rows * 4 - out, cols), dtype=torch.uint8, device=u.device)))
    blocks = u.view(4, rows, cols)
    packed = blocks[3] << 6
    packed |= blocks[2] << 4
    packed |= blocks[1] << 2
    packed |= blocks[0]
    return packed


def unpack_rows(packed: torch.Tensor, out: int) -> torch.Tensor:
    """uint8 [ceil(out/4), in] -> int8 codes [out, in]."""
    if packed.dtype != torch.uint8 or packed.ndim != 2 or packed.shape[0] != -(-out // 4):
        raise LayoutError(
            f"HF packed weight for {out} output rows must be uint8 [{-(-out // 4)}, in], "
            f"got {packed.dtype} {tuple(packed.shape)}"
        )
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=packed.device).view(4, 1, 1)
    codes = ((packed.unsqueeze(0) >> shifts) & 3).view(-1, packed.shape[1])[:out]
    return codes.to(torch.int8) - 1


def _stored_scale(tw: TernaryWeight) -> torch.Tensor:
    """The scale as stored: shape [1] per tensor (what files hold) or [out] per row (fused projections)."""
    check_codes(tw)
    return tw.scale.float().reshape(-1)


def _canonical_scale(pw: PackedWeight) -> torch.Tensor:
    scale = pw.scale.float().reshape(-1)
    return scale.reshape(()) if scale.numel() == 1 else scale


def _pack(tw: TernaryWeight) -> PackedWeight:
    scale = _stored_scale(tw)
    return PackedWeight("hf", pack_rows(tw.codes), scale, tw.shape)


def _unpack(pw: PackedWeight) -> TernaryWeight:
    return TernaryWeight(unpack_rows(pw.data, pw.shape[0]), _canonical_scale(pw))


def _pack_inv(tw: TernaryWeight) -> PackedWeight:
    scale = 1.0 / _stored_scale(tw)
    return PackedWeight("hf_inv", pack_rows(tw.codes), scale, tw.shape)


def _unpack_inv(pw: PackedWeight) -> TernaryWeight:
    return TernaryWeight(unpack_rows(pw.data, pw.shape[0]), 1.0 / _canonical_scale(pw))


HF = register_layout(Layout("hf", 2.0, _pack, _unpack, "HF packed, weight_scale multiplies (autobitlinear)"))
HF_INV = register_layout(
    Layout("hf_inv", 2.0, _pack_inv, _unpack_inv, "HF packed, weight_scale divides (bitlinear)")
)


def _swap_convention(layout: str):
    def convert(pw: PackedWeight) -> PackedWeight:
        return PackedWeight(layout, pw.data, 1.0 / pw.scale.float(), pw.shape)

    return convert


# Same bits, reciprocal scale: switching convention never unpacks (and keeps a memory-mapped tensor mapped).
register_direct_conversion("hf", "hf_inv", _swap_convention("hf_inv"))
register_direct_conversion("hf_inv", "hf", _swap_convention("hf"))

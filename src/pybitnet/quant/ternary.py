"""Absmean ternary weight quantization and the canonical ternary weight.

Every file format converts to and from `TernaryWeight`; every kernel packs from it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SCALE_EPS = 1e-5


@dataclass(frozen=True)
class TernaryWeight:
    """int8 codes in {-1, 0, +1} of shape [out, in] and a float32 scale: real weight = codes * scale.

    `scale` is a 0-d tensor (per tensor) or of shape [out] (per output row, e.g. fused projections).
    """

    codes: torch.Tensor
    scale: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.codes.shape[0]), int(self.codes.shape[1]))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        scale = self.scale.to(torch.float32)
        if scale.ndim == 1:
            scale = scale[:, None]
        return (self.codes.to(torch.float32) * scale).to(dtype)


def absmean_scale(w: torch.Tensor) -> torch.Tensor:
    """Per-tensor scale mean(|W|), clamped below so an all-zero tensor stays finite."""
    return w.detach().float().abs().mean().clamp(min=SCALE_EPS)


def ternarize(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """clamp(round(W / s), -1, 1) as float32, round half to even.

    Multiplies by 1/s (as transformers and the BitNet reference code do) so latent checkpoints ternarize to
    the same codes they do, bit for bit, even at rounding ties.
    """
    return (w.float() * (1.0 / scale)).round().clamp(-1, 1)


def quantize_weight(w: torch.Tensor) -> TernaryWeight:
    """Absmean ternary quantization of a latent float weight [out, in]."""
    scale = absmean_scale(w)
    return TernaryWeight(ternarize(w, scale).to(torch.int8), scale)


def fake_quantize_weight(w: torch.Tensor) -> torch.Tensor:
    """Quantize-dequantize in the weight's dtype (the forward value of the training STE)."""
    scale = absmean_scale(w)
    return (ternarize(w, scale) * scale).to(w.dtype)

"""Symmetric absmax int8 activation quantization, per token (last dim) or per tensor."""

from __future__ import annotations

import torch

ACT_EPS = 1e-5
QMAX = 127
QMIN = -128


def absmax_scale(x: torch.Tensor, per_token: bool = True) -> torch.Tensor:
    """a = 127 / max|x| (float32), keepdim over the last dim per token, or a 0-d tensor per tensor."""
    xf = x.detach().float().abs()
    amax = xf.amax(dim=-1, keepdim=True) if per_token else xf.amax()
    return QMAX / amax.clamp(min=ACT_EPS)


def quantize_activations(x: torch.Tensor, per_token: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (xq int8, a float32) with xq = clamp(round(x * a), -128, 127); x ≈ xq / a."""
    a = absmax_scale(x, per_token)
    xq = (x.float() * a).round().clamp(QMIN, QMAX).to(torch.int8)
    return xq, a


def fake_quantize_activations(x: torch.Tensor, per_token: bool = True) -> torch.Tensor:
    """Quantize-dequantize in x's dtype (the forward value of the training STE)."""
    a = absmax_scale(x, per_token)
    return ((x.float() * a).round().clamp(QMIN, QMAX) / a).to(x.dtype)

"""Straight-through estimators for quantization-aware training.

Written as `x + (q(x) - x).detach()` rather than autograd.Functions so torch.compile traces them without graph
breaks or host syncs. `lam` blends gradually from full precision (0) to fully quantized (1).
"""

from __future__ import annotations

import torch

from .activations import fake_quantize_activations
from .ternary import fake_quantize_weight


def ste_weight(w: torch.Tensor, lam: float | torch.Tensor = 1.0) -> torch.Tensor:
    """Forward: w + lam * (ternary(w) - w); backward: identity (the scale gets no gradient)."""
    return w + (lam * (fake_quantize_weight(w) - w)).detach()


def ste_activations(x: torch.Tensor, lam: float | torch.Tensor = 1.0, per_token: bool = True) -> torch.Tensor:
    """Forward: x + lam * (int8(x) - x); backward: identity."""
    return x + (lam * (fake_quantize_activations(x, per_token) - x)).detach()

"""Random ternary models at real shapes, for tests and benchmarks (no hub is needed)."""

from __future__ import annotations

import torch
from torch import nn

from ..kernels import Kernel, select_kernel
from ..nn import PackedBitLinear
from ..quant import TernaryWeight
from .config import ModelConfig
from .transformer import Transformer


def random_ternary(out: int, cols: int, generator: torch.Generator) -> TernaryWeight:
    """Codes uniform in {-1, 0, 1}; a scale like a trained layer's (bf16-exact so files round-trip)."""
    codes = torch.randint(-1, 2, (out, cols), generator=generator, dtype=torch.int8)
    scale = (torch.rand((), generator=generator) * 1.5 + 0.5) / cols**0.5
    return TernaryWeight(codes, scale.to(torch.bfloat16).float())


def random_model(
    config: ModelConfig, seed: int = 0, dtype: torch.dtype = torch.float32, kernel: Kernel | str | None = None
) -> Transformer:
    """A Transformer with random ternary linears and random norms / embeddings of realistic magnitude."""
    kernel = kernel if isinstance(kernel, Kernel) else select_kernel("cpu", kernel)
    g = torch.Generator().manual_seed(seed)

    def linear(cols: int, out: int) -> nn.Module:
        return PackedBitLinear.from_ternary(random_ternary(out, cols, g), kernel)

    with torch.no_grad():
        model = Transformer(config, linear)
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.02 * torch.randn(p.shape, generator=g) if "lm_head" in name else torch.randn(p.shape, generator=g))
    return model.to(dtype).eval().requires_grad_(False)

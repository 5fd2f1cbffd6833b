"""Random ternary models at real shapes, for tests and benchmarks (no hub is needed)."""

from __future__ import annotations

import torch
from torch import nn

from ..kernels import Kernel, select_kernel
from ..nn import BitLinear, PackedBitLinear
from ..quant import TernaryWeight
from .config import ModelConfig
from .transformer import Transformer


def random_ternary(out: int, cols: int, generator: torch.Generator) -> TernaryWeight:
    """Codes uniform in {-1, 0, 1}; a scale like a trained layer's (bf16-exact so files round-trip)."""
    codes = torch.randint(-1, 2, (out, cols), generator=generator, dtype=torch.int8)
    scale = (torch.rand((), generator=generator) * 1.5 + 0.5) / cols**0.5
    return TernaryWeight(codes, scale.to(torch.bfloat16).float())


def _init_float_params(model: Transformer, g: torch.Generator) -> None:
    """Norm gains near 1, unit-variance embeddings, a small untied head, latent weights ~ N(0, 1/in). Drawn in
    place (the same numbers as torch.randn), so a 2B-4T embedding needs no second copy while it is made."""
    for name, p in model.named_parameters():
        p.normal_(generator=g)
        if name.endswith("norm.weight"):
            p.mul_(0.1).add_(1.0)
        elif name.startswith("lm_head."):
            p.mul_(0.02)
        elif not name.startswith("embed_tokens."):
            p.div_(p.shape[-1] ** 0.5)


def random_model(
    config: ModelConfig, seed: int = 0, dtype: torch.dtype = torch.float32, kernel: Kernel | str | None = None
) -> Transformer:
    """A Transformer with random packed ternary linears, and norms / embeddings of realistic magnitude."""
    kernel = kernel if isinstance(kernel, Kernel) else select_kernel("cpu", kernel)
    g = torch.Generator().manual_seed(seed)

    def linear(cols: int, out: int) -> nn.Module:
        return PackedBitLinear.from_ternary(random_ternary(out, cols, g), kernel)

    with torch.no_grad():
        model = Transformer(config, linear)
        _init_float_params(model, g)
    return model.to(dtype).eval().requires_grad_(False)


def random_latent_model(
    config: ModelConfig, seed: int = 0, dtype: torch.dtype = torch.float32
) -> Transformer:
    """A Transformer in training form: BitLinear layers with random latent float weights (as 1bitLLM
    checkpoints and bf16 master weights hold them)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model = Transformer(config, lambda cols, out: BitLinear(cols, out, bias=False))
        _init_float_params(model, g)
    return model.to(dtype)

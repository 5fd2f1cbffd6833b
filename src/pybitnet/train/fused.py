"""BitLinear training on int8 tensor cores: the forward product runs as int8 x int8 -> int32 (exact), and the
backward reads the int8 activations saved instead of float ones.

Forward: per-token absmax int8 activations and absmean ternary codes come from the same torch functions as the
reference path (so the codes are bit-identical, and torch.compile fuses them into the neighbouring norm and
cast kernels); the Triton int8 GEMM (`int8_gemm`) accumulates exactly in int32 and applies s / a per row in
its epilogue, like the integer reference kernel.

Backward (straight-through), from the saved int8 activations, their scales and the latent weight (a parameter,
alive anyway, so the ternary codes are recomputed rather than kept: a quarter of the weights' size less memory
between forward and backward):
- grad_w = g^T @ bf16(xq / a): the reference's fake-quantized input, bit for bit. On CUDA the GEMMs write
  float32 gradients (the weights', and a float32 input's) straight from their accumulators, where the
  reference rounds them to bf16 first.
- grad_x, by `grad_x_mode`:
  - "bf16": g @ bf16(codes * s), the reference's fake-quantized weight, bit for bit (a float GEMM);
  - "int8": g times each weight row's scale s, quantized per row to int8 (absmax, like activations), then the
    int8 GEMM with the ternary codes (exact) and 1 / a_g in the epilogue: about twice the tensor-core rate,
    at the price of rounding g to 8 bits per row (relative error ~1e-2 on grad_x; the weight gradients keep
    float g).

Layers of different widths that read the same input (grouped-query q/k/v: `FusedBitLinear.forward_many`,
through nn.fused_linears) run as one product on their stacked codes, each row with its own layer's scale: one
quantization of x, one GEMM forward and two backward instead of one per layer, and no narrow k/v products.

The layer is a torch.library custom op with a fake implementation and an autograd formula, so torch.compile
captures it, forward and backward, without graph breaks. It applies at full quantization only (λ = 1 for
weights and activations); the trainer switches layers to it when λ reaches 1, from Python floats (no host
sync).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..errors import ConfigError
from ..nn import BitLinear
from ..quant.activations import quantize_activations
from ..quant.ternary import absmean_scale, ternarize
from .config import GRAD_X_MODES
from .int8_gemm import int8_matmul, triton_available


@torch.library.custom_op("pybitnet::bitlinear_int8", mutates_args=())
def _bitlinear_int8(
    x: torch.Tensor,
    ws: list[torch.Tensor],
    xq: torch.Tensor,
    a: torch.Tensor,
    wq: torch.Tensor,
    s: torch.Tensor,
    out_dtype: torch.dtype,
    grad_x_mode: str,
) -> torch.Tensor:
    """y [M, N] = (xq @ wq^T) * s / a, wq the stacked codes of the weights `ws`. `x` and `ws` (the latent
    inputs) only route the straight-through gradients; the forward reads the int8 tensors and their scales
    (a [M], s [N] per weight row, float32)."""
    return int8_matmul(xq, wq, a, s, out_dtype)


@_bitlinear_int8.register_fake
def _(x, ws, xq, a, wq, s, out_dtype, grad_x_mode):
    return x.new_empty((x.shape[0], sum(w.shape[0] for w in ws)), dtype=out_dtype)


def _setup_context(ctx, inputs, output):
    x, ws, xq, a, _, s, _, grad_x_mode = inputs
    # int8 activations, not float ones; the weights are the parameters themselves (no stacked copy is kept)
    ctx.save_for_backward(xq, a, s, *ws)
    ctx.x_dtype, ctx.grad_x_mode = x.dtype, grad_x_mode


# Float32 gradients straight from the GEMM's accumulator where torch has the op (module switch: the training
# benchmark times both).
FLOAT32_GRADIENTS = "dtype" in torch.ops.aten.mm.overloads()


def _mm(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """a @ b as `out_dtype`. A float32 result of 16-bit operands comes straight from the GEMM's float32
    accumulator on CUDA (cuBLAS): no rounding to 16 bits and no cast kernel after it."""
    half = a.dtype in (torch.bfloat16, torch.half)
    if FLOAT32_GRADIENTS and a.is_cuda and out_dtype == torch.float32 and half:
        return torch.mm(a, b, out_dtype=torch.float32)
    return (a @ b).to(out_dtype)


def _grad_input(g: torch.Tensor, w: torch.Tensor, s: torch.Tensor, mode: str, dtype: torch.dtype):
    """g @ (codes * s) as `dtype`, for the codes the forward used (same w, same s, so the same rounding)."""
    if mode == "int8":  # s scales the contraction index here, so it goes into g before g is quantized
        gq, ag = quantize_activations(g.float() * s)
        codes_t = ternarize(w.t(), s).to(torch.int8).contiguous()  # [K, N]: the GEMM's row-major B^T
        return int8_matmul(gq, codes_t, ag.reshape(-1), s.new_ones(1), dtype)
    return _mm(g, (ternarize(w, s[:, None]) * s[:, None]).to(g.dtype), dtype)


def _backward(ctx, g):
    xq, a, s, *ws = ctx.saved_tensors
    w = torch.cat(ws) if len(ws) > 1 else ws[0]
    grad_x = _grad_input(g, w, s, ctx.grad_x_mode, ctx.x_dtype)
    x_deq = (xq.float() / a[:, None]).to(g.dtype)  # the fake-quantized input, as the reference path has it
    grad_w = _mm(g.t(), x_deq, w.dtype).split([wi.shape[0] for wi in ws])
    return grad_x, list(grad_w), None, None, None, None, None, None


_bitlinear_int8.register_autograd(_backward, setup_context=_setup_context)


def fused_bitlinear(
    x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, grad_x_mode: str = "bf16"
) -> torch.Tensor:
    """y = BitLinear(x) at λ = 1 with the int8 GEMM. x [..., K], w [N, K] (latent float weights)."""
    y = fused_bitlinear_many(x, [w], grad_x_mode)[0]
    return y if bias is None else y + bias.to(y.dtype)


def fused_bitlinear_many(
    x: torch.Tensor, weights: list[torch.Tensor], grad_x_mode: str
) -> list[torch.Tensor]:
    """[BitLinear_i(x)] at λ = 1 for bias-free layers reading the same x, as one int8 GEMM on their stacked
    codes, each row keeping its layer's scale: x is quantized once and the backward is one grad_x and one
    grad_w product."""
    if grad_x_mode not in GRAD_X_MODES:
        raise ConfigError(f"grad_x_mode: {grad_x_mode!r} is not one of {', '.join(GRAD_X_MODES)}")
    if not weights or any(w.dim() != 2 or w.shape[1] != x.shape[-1] for w in weights):
        shapes = [tuple(w.shape) for w in weights]
        raise ValueError(f"weights must be one or more [N, {x.shape[-1]}] matrices for x, got {shapes}")
    autocast = x.is_cuda and torch.is_autocast_enabled("cuda")
    dtype = torch.get_autocast_dtype("cuda") if autocast else x.dtype
    x2 = x.reshape(-1, x.shape[-1])
    xq, a = quantize_activations(x2)  # as the reference path: in the dtype x arrives in
    scales = [absmean_scale(wi) for wi in weights]
    s = torch.cat([si.reshape(1).expand(wi.shape[0]) for wi, si in zip(weights, scales, strict=True)])
    codes = [ternarize(wi.detach(), si).to(torch.int8) for wi, si in zip(weights, scales, strict=True)]
    wq = torch.cat(codes) if len(codes) > 1 else codes[0]
    y = _bitlinear_int8(x2, list(weights), xq, a.reshape(-1), wq, s, dtype, grad_x_mode)
    return [yi.reshape(*x.shape[:-1], yi.shape[-1]) for yi in y.split([wi.shape[0] for wi in weights], -1)]


class FusedBitLinear(BitLinear):
    """BitLinear whose forward runs on the int8 GEMM whenever `fused` is set (the trainer sets it once λ is 1
    for weights and activations); otherwise the reference straight-through path."""

    fused: bool = True
    grad_x_mode: str = "bf16"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fused:
            return super().forward(x)
        if self.input_norm is not None:
            x = self.input_norm(x)
        return fused_bitlinear(x, self.weight, self.bias, self.grad_x_mode)

    @staticmethod
    def forward_many(x: torch.Tensor, layers: Sequence[nn.Module]) -> list[torch.Tensor]:
        """[layer(x) for layer in layers] (see nn.fused_linears): one stacked product when some layer is at
        most half as wide as another (grouped-query q/k/v: a narrow product runs the int8 GEMM at ~0.6 of
        its rate on an H200) and every layer is fused, bias-free, without an input norm and in the same
        grad_x mode. Equal widths (gate/up) keep their own products: the rate is the same, and outputs that
        are slices of one stacked tensor can keep all of it alive for the backward."""
        first = layers[0]
        widths = [m.out_features for m in layers]
        if 2 * min(widths) <= max(widths) and all(
            isinstance(m, FusedBitLinear)
            and m.fused
            and m.bias is None
            and m.input_norm is None
            and m.grad_x_mode == first.grad_x_mode
            for m in layers
        ):
            return fused_bitlinear_many(x, [m.weight for m in layers], first.grad_x_mode)
        return [m(x) for m in layers]


def use_fused_kernels(model: nn.Module, grad_x_mode: str = "bf16") -> int:
    """Turn every BitLinear of `model` into a FusedBitLinear (same parameters, buffers); return the count."""
    if grad_x_mode not in GRAD_X_MODES:
        raise ConfigError(f"grad_x_mode: {grad_x_mode!r} is not one of {', '.join(GRAD_X_MODES)}")
    if not triton_available():
        return 0
    count = 0
    for m in model.modules():
        if type(m) is BitLinear:  # a class swap keeps parameters, buffers and state-dict names as they are
            m.__class__ = FusedBitLinear
            count += 1
        if isinstance(m, FusedBitLinear):
            m.grad_x_mode = grad_x_mode
    return count


def set_fused(model: nn.Module, enabled: bool) -> None:
    for m in model.modules():
        if isinstance(m, FusedBitLinear):
            m.fused = enabled


__all__ = [
    "GRAD_X_MODES",
    "FusedBitLinear",
    "fused_bitlinear",
    "fused_bitlinear_many",
    "int8_matmul",
    "set_fused",
    "triton_available",
    "use_fused_kernels",
]

"""BitLinear in its two forms.

- `BitLinear`: the training form, a drop-in for nn.Linear. Latent float weights; forward quantizes weights
  (absmean ternary) and activations (per-token int8) through straight-through estimators.
- `PackedBitLinear`: the inference form. Packed ternary weights in a kernel's layout plus that kernel.

`BitLinear.to_packed()` and `PackedBitLinear.to_latent()` convert between them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LayoutError
from ..kernels import Kernel, select_kernel
from ..quant import PackedWeight, TernaryWeight, pack, quantize_weight, unpack
from ..quant.ste import ste_activations, ste_weight
from .norm import RMSNorm


class BitLinear(nn.Linear):
    """nn.Linear with BitNet b1.58 quantization-aware training.

    `input_norm=True` adds the RMSNorm on the input that the original BitNet paper puts inside BitLinear.
    `quant_strength` (λ, 0..1) blends weights from full precision to fully quantized, for gradual conversion;
    `act_quant_strength` does the same for activations.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        input_norm: bool = False,
        norm_eps: float = 1e-6,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.input_norm = RMSNorm(in_features, norm_eps, device=device, dtype=dtype) if input_norm else None
        self.register_buffer("quant_strength", torch.ones((), device=device), persistent=False)
        self.register_buffer("act_quant_strength", torch.ones((), device=device), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_norm is not None:
            x = self.input_norm(x)
        x = ste_activations(x, self.act_quant_strength)
        return F.linear(x, ste_weight(self.weight, self.quant_strength), self.bias)

    def ternary(self) -> TernaryWeight:
        return quantize_weight(self.weight)

    def to_packed(self, kernel: Kernel | str | None = None) -> PackedBitLinear:
        """The inference form of this layer's current weights (absmean-ternarized)."""
        device = self.weight.device
        kernel = kernel if isinstance(kernel, Kernel) else select_kernel(device, kernel)
        packed = PackedBitLinear.from_ternary(self.ternary(), kernel, bias=self.bias, dtype=self.weight.dtype)
        if self.input_norm is not None:
            packed.input_norm = self.input_norm
        return packed.to(device)


class PackedBitLinear(nn.Module):
    """Inference-only ternary linear: buffers `packed` (uint8) and `scale` (float32), in the kernel's
    layout."""

    def __init__(
        self,
        packed: PackedWeight,
        kernel: Kernel,
        bias: torch.Tensor | None = None,
        input_norm: RMSNorm | None = None,
    ) -> None:
        super().__init__()
        self.kernel = kernel
        self.layout = packed.layout
        self.out_features, self.in_features = packed.shape
        self.register_buffer("packed", packed.data)
        self.register_buffer("scale", packed.scale)
        self.register_buffer("bias", bias)
        self.input_norm = input_norm

    @classmethod
    def from_ternary(
        cls,
        tw: TernaryWeight,
        kernel: Kernel,
        bias: torch.Tensor | None = None,
        input_norm: RMSNorm | None = None,
        dtype: torch.dtype | None = None,
    ) -> PackedBitLinear:
        bias = None if bias is None else bias.detach().to(dtype or bias.dtype)
        return cls(kernel.prepare(pack(tw, "hf")), kernel, bias, input_norm)

    @classmethod
    def from_packed(cls, pw: PackedWeight, kernel: Kernel, **kwargs) -> PackedBitLinear:
        return cls(kernel.prepare(pw), kernel, **kwargs)

    def _apply(self, fn, recurse=True):
        # .to(dtype) on the model must not round the float32 scale; device moves still apply
        scale = self.scale
        super()._apply(fn, recurse)
        self.scale = scale.to(self.scale.device)
        return self

    def weight(self) -> PackedWeight:
        packed, scale = self._buffers["packed"], self._buffers["scale"]
        pw = self.__dict__.get("_weight")
        if pw is None or pw.data is not packed or pw.scale is not scale:
            pw = PackedWeight(self.layout, packed, scale, (self.out_features, self.in_features))
            self.__dict__["_weight"] = pw  # reused while the buffers are the same tensors
        return pw

    def ternary(self) -> TernaryWeight:
        return unpack(self.weight())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_norm is not None:
            x = self.input_norm(x)
        y = self.kernel.linear(x, self.weight())
        return y if self.bias is None else y + self.bias

    def to_latent(self, dtype: torch.dtype = torch.float32) -> BitLinear:
        """A training-form BitLinear computing what this layer computes: latent weights
        codes * s / mean|codes|, whose absmean ternarization gives back exactly these codes and (up to
        rounding) the scale s. (Plain codes * s would ternarize to the scale s * mean|codes|.)"""
        layer = BitLinear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            input_norm=self.input_norm is not None,
            device=self.packed.device,
            dtype=dtype,
        )
        tw = self.ternary()
        if tw.scale.numel() != 1:
            raise LayoutError("to_latent needs one scale per tensor (absmean training has no per-row scales)")
        density = tw.codes.float().abs().mean().clamp(min=1.0 / tw.codes.numel())
        with torch.no_grad():
            layer.weight.copy_(TernaryWeight(tw.codes, tw.scale / density).dequantize(dtype))
            if self.bias is not None:
                layer.bias.copy_(self.bias)
            if self.input_norm is not None:
                layer.input_norm.load_state_dict(self.input_norm.state_dict())
        return layer

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"layout={self.layout}, kernel={self.kernel.name}"
        )


def fused_linears(
    x: torch.Tensor, layers: Sequence[nn.Module], norm: RMSNorm | None = None
) -> list[torch.Tensor]:
    """[layer(norm(x)) for layer in layers], for layers that read the same input (q/k/v, gate/up).

    When every layer is a bias-free PackedBitLinear on one kernel with `linear_many` (the C kernels), this is
    one call: the RMSNorm is fused with the activation quantization, which runs once for all layers, and
    every layer's rows share one parallel region. Layers of a type with a `forward_many(x, layers)` static
    method (the int8 training layer) run through it; otherwise (the reference kernel, training) the layers
    run one by one.
    """
    kernel = getattr(layers[0], "kernel", None)
    fusable = (
        kernel is not None
        and kernel.linear_many is not None
        and x.device.type == "cpu"
        and (norm is None or type(norm) is RMSNorm)
        and all(
            isinstance(m, PackedBitLinear) and m.kernel is kernel and m.bias is None and m.input_norm is None
            for m in layers
        )
    )
    if fusable:
        spec = None if norm is None else (norm.weight, norm.eps)
        return kernel.linear_many(x, [m.weight() for m in layers], spec)
    if norm is not None:
        x = norm(x)
    many = getattr(type(layers[0]), "forward_many", None)
    if many is not None and len(layers) > 1 and all(type(m) is type(layers[0]) for m in layers):
        return many(x, layers)
    return [m(x) for m in layers]

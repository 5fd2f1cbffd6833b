"""The output head on CPU: int8 weights with one scale per vocabulary row, run by the C kernels.

The head is the largest single matrix of a BitNet model (128256 x 2560 for 2B-4T): in bf16 it is read in full
for every generated token and costs more bandwidth than all the ternary layers together. Per-row int8 halves
that; activations are quantized per token as for the ternary layers (absmax int8), and the final RMSNorm is
fused into that quantization.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from ..errors import KernelError
from . import cpu

CHUNK_ROWS = 8192  # rows quantized at a time, so a bf16 head never has a full float32 copy


class HeadRows(Protocol):
    """A [V, K] float weight, or anything with its `shape` whose [r0:r1] slices give those rows as a
    tensor (e.g. blocks read from a checkpoint file)."""

    @property
    def shape(self) -> tuple[int, ...] | torch.Size: ...

    def __getitem__(self, rows: slice) -> torch.Tensor: ...


def quantize_rows_int8(weight: HeadRows) -> tuple[torch.Tensor, torch.Tensor]:
    """[V, K] float -> (int8 tiles [ceil(V/4), Kp/32, 4, 32], float32 scales [V]); w ~= q * scale.

    Kp is K rounded up to 128; padding holds zeros. Tiles put 4 rows' 32-value chunks side by side, so the
    kernel streams the head sequentially (see csrc/bitnet_cpu.h)."""
    rows, cols = weight.shape
    kp = -(-cols // 128) * 128
    q = torch.zeros((-(-rows // 4) * 4, kp), dtype=torch.int8)
    scale = torch.empty(rows, dtype=torch.float32)
    for r0 in range(0, rows, CHUNK_ROWS):
        w = weight[r0 : r0 + CHUNK_ROWS].detach().to("cpu", torch.float32)
        s = w.abs().amax(dim=1).clamp(min=1e-8) / 127
        q[r0 : r0 + w.shape[0], :cols] = (w / s[:, None]).round().clamp(-127, 127).to(torch.int8)
        scale[r0 : r0 + w.shape[0]] = s
    return tile_rows(q), scale


def tile_rows(q: torch.Tensor) -> torch.Tensor:
    """int8 [4T, Kp] row-major -> tiles [T, Kp/32, 4, 32]."""
    rows, kp = q.shape
    return q.view(rows // 4, 4, kp // 32, 32).transpose(1, 2).contiguous()


def untile_rows(tiles: torch.Tensor) -> torch.Tensor:
    t, chunks, _, _ = tiles.shape
    return tiles.transpose(1, 2).reshape(t * 4, chunks * 32)


class Int8Head(nn.Module):
    """logits = quant(rms_norm(x)) @ (q * scale).T, float32; q in tiles (quantize_rows_int8); the buffers are
    not saved with the model."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, in_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = scale.shape[0]
        self.register_buffer("q", q, persistent=False)
        self.register_buffer("scale", scale, persistent=False)

    @classmethod
    def from_float(cls, weight: HeadRows) -> Int8Head:
        q, scale = quantize_rows_int8(weight)
        return cls(q, scale, weight.shape[1])

    def _apply(self, fn, recurse=True):
        # casting the model to bf16 must not round the float32 scales
        scale = self.scale
        super()._apply(fn, recurse)
        self.scale = scale.to(self.scale.device)
        return self

    def rows(self) -> torch.Tensor:
        """The int8 weight as a row-major [V, K] tensor."""
        return untile_rows(self.q)[: self.out_features, : self.in_features]

    def dequantize(self) -> torch.Tensor:
        return self.rows().float() * self.scale[:, None]

    def forward(self, x: torch.Tensor, norm: nn.Module | None = None) -> torch.Tensor:
        """x [..., K] -> logits [..., V] float32; `norm` (an RMSNorm) is applied first, in the kernel."""
        if not cpu.native_available():
            raise KernelError("the int8 head runs on the C kernels, which are not built")
        k = self.in_features
        x2 = x.reshape(-1, k).to(torch.float32).contiguous()
        y = torch.empty((x2.shape[0], self.out_features), dtype=torch.float32)
        norm_ptr, eps = 0, 0.0
        if norm is not None:
            nw = norm.weight.detach().to(torch.float32).contiguous()
            norm_ptr, eps = nw.data_ptr(), float(norm.eps)
        if x2.shape[0]:
            cpu.run_int8(x2, norm_ptr, eps, self.q, self.scale, y)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-row"

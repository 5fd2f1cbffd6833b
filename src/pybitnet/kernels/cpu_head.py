"""The output head on CPU: int8 (default) or 4-bit weights with one scale per vocabulary row, run by the C
kernels.

The head is the largest single matrix of a BitNet model (128256 x 2560 for 2B-4T): in bf16 it is read in full
for every generated token and costs more bandwidth than all the ternary layers together. Per-row int8 halves
that, 4-bit quarters it (at a measurable cost in agreement with the bf16 head, see
benchmarks/cpu_head_quality.py); activations are quantized per token as for the ternary layers (absmax int8),
and the final RMSNorm is fused into that quantization.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from ..errors import KernelError
from ..formats.memory import streamed_copy
from ..quant.layouts.cpu_i2 import padded_cols
from . import cpu

CHUNK_ROWS = 8192  # rows quantized at a time, so a bf16 head never has a full float32 copy
INT4_CLIPS = (1.0, 0.9, 0.8, 0.7, 0.6)  # fractions of a row's absmax tried as its 4-bit range


class HeadRows(Protocol):
    """A [V, K] float weight, or anything with its `shape` whose [r0:r1] slices give those rows as a
    tensor (e.g. blocks read from a checkpoint file)."""

    @property
    def shape(self) -> tuple[int, ...] | torch.Size: ...

    def __getitem__(self, rows: slice) -> torch.Tensor: ...


def _rows_blocks(weight: HeadRows):
    """(r0, float32 rows [r0 : r0 + CHUNK_ROWS]) blocks of a head weight."""
    for r0 in range(0, weight.shape[0], CHUNK_ROWS):
        yield r0, weight[r0 : r0 + CHUNK_ROWS].detach().to("cpu", torch.float32)


def quantize_rows_int8(weight: HeadRows) -> tuple[torch.Tensor, torch.Tensor]:
    """[V, K] float -> (int8 tiles [ceil(V/4), Kp/32, 4, 32], float32 scales [V]); w ~= q * scale.

    Kp is K rounded up to 128; padding holds zeros. Tiles put 4 rows' 32-value chunks side by side, so the
    kernel streams the head sequentially (see csrc/bitnet_cpu.h)."""
    rows, cols = weight.shape
    q = torch.zeros((-(-rows // 4) * 4, padded_cols(cols)), dtype=torch.int8)
    scale = torch.empty(rows, dtype=torch.float32)
    for r0, w in _rows_blocks(weight):
        s = w.abs().amax(dim=1).clamp(min=1e-8) / 127
        q[r0 : r0 + w.shape[0], :cols] = (w / s[:, None]).round().clamp(-127, 127).to(torch.int8)
        scale[r0 : r0 + w.shape[0]] = s
    return tile_rows(q), scale


def tile_rows(q: torch.Tensor) -> torch.Tensor:
    """int8 [4T, Kp] row-major -> tiles [T, Kp/32, 4, 32]."""
    rows, kp = q.shape
    return streamed_copy(q.view(rows // 4, 4, kp // 32, 32).transpose(1, 2))  # streamed every token


def untile_rows(tiles: torch.Tensor) -> torch.Tensor:
    t, chunks, _, _ = tiles.shape
    return tiles.transpose(1, 2).reshape(t * 4, chunks * 32)


def _int4_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric 4-bit codes in [-7, 7] and scales, each row's range clipped where that lowers its
    squared error (a few large values would otherwise leave most of a row on 2 or 3 levels)."""
    amax = w.abs().amax(dim=1).clamp(min=1e-8)
    best_q, best_s, best_err = None, None, None
    for clip in INT4_CLIPS:
        s = amax * clip / 7
        q = (w / s[:, None]).round().clamp(-7, 7)
        err = (q * s[:, None] - w).pow(2).sum(dim=1)
        if best_err is None:
            best_q, best_s, best_err = q, s, err
            continue
        better = err < best_err
        best_q = torch.where(better[:, None], q, best_q)
        best_s, best_err = torch.where(better, s, best_s), torch.minimum(err, best_err)
    return best_q.to(torch.int8), best_s


def quantize_rows_int4(weight: HeadRows) -> tuple[torch.Tensor, torch.Tensor]:
    """[V, K] float -> (4-bit nibble tiles uint8 [ceil(V/4), Kp/64, 4, 32], float32 scales [V]).

    Byte i of a row's 64-value chunk holds w + 8 of element i (low nibble) and of element 32 + i (high), so
    the kernel unpacks with a mask and a shift; padding holds w = 0 (see csrc/bitnet_cpu.h)."""
    rows, cols = weight.shape
    kp = padded_cols(cols)
    q = torch.zeros((-(-rows // 4) * 4, kp), dtype=torch.int8)
    scale = torch.empty(rows, dtype=torch.float32)
    for r0, w in _rows_blocks(weight):
        q[r0 : r0 + w.shape[0], :cols], scale[r0 : r0 + w.shape[0]] = _int4_rows(w)
    u = (q + 8).to(torch.uint8).view(-1, kp // 64, 2, 32)
    nibbles = u[:, :, 0] | (u[:, :, 1] << 4)  # [4T, Kp/64, 32]
    return streamed_copy(nibbles.view(-1, 4, kp // 64, 32).transpose(1, 2)), scale


def untile_int4(tiles: torch.Tensor) -> torch.Tensor:
    """4-bit nibble tiles -> int8 codes [4T, Kp], row-major."""
    t, chunks, _, _ = tiles.shape
    rows = tiles.transpose(1, 2).reshape(t * 4, chunks, 1, 32)
    both = torch.cat((rows & 15, rows >> 4), dim=2)
    return both.reshape(t * 4, chunks * 64).to(torch.int8) - 8


class Int8Head(nn.Module):
    """logits = quant(rms_norm(x)) @ (q * scale).T, float32; q in tiles (quantize_rows_int8); the buffers are
    not saved with the model."""

    bits = 8

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, in_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = scale.shape[0]
        self.register_buffer("q", q, persistent=False)
        self.register_buffer("scale", scale, persistent=False)

    @staticmethod
    def quantize(weight: HeadRows) -> tuple[torch.Tensor, torch.Tensor]:
        return quantize_rows_int8(weight)

    @classmethod
    def from_float(cls, weight: HeadRows) -> Int8Head:
        q, scale = cls.quantize(weight)
        return cls(q, scale, weight.shape[1])

    def _apply(self, fn, recurse=True):
        # casting the model to bf16 must not round the float32 scales
        scale = self.scale
        super()._apply(fn, recurse)
        self.scale = scale.to(self.scale.device)
        return self

    def rows(self) -> torch.Tensor:
        """The integer weight as a row-major int8 [V, K] tensor."""
        return untile_rows(self.q)[: self.out_features, : self.in_features]

    def dequantize(self) -> torch.Tensor:
        return self.rows().float() * self.scale[:, None]

    def forward(self, x: torch.Tensor, norm: nn.Module | None = None) -> torch.Tensor:
        """x [..., K] -> logits [..., V] float32; `norm` (an RMSNorm) is applied first, in the kernel."""
        if not cpu.native_available():
            raise KernelError("the quantized head runs on the C kernels, which are not built")
        k = self.in_features
        x2 = x.reshape(-1, k).to(torch.float32).contiguous()
        y = torch.empty((x2.shape[0], self.out_features), dtype=torch.float32)
        norm_ptr, eps = 0, 0.0
        if norm is not None:
            nw = norm.weight.detach().to(torch.float32).contiguous()
            norm_ptr, eps = nw.data_ptr(), float(norm.eps)
        if x2.shape[0]:
            cpu.run_head(self.bits, x2, norm_ptr, eps, self.q, self.scale, y)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int{self.bits} per-row"


class Int4Head(Int8Head):
    """The 4-bit head: q holds nibble tiles (quantize_rows_int4), half the int8 head's bytes."""

    bits = 4

    @staticmethod
    def quantize(weight: HeadRows) -> tuple[torch.Tensor, torch.Tensor]:
        return quantize_rows_int4(weight)

    def rows(self) -> torch.Tensor:
        return untile_int4(self.q)[: self.out_features, : self.in_features]

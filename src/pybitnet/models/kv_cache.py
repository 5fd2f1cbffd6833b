"""A preallocated KV cache, one per model: [layers, batch, kv_heads, max_len, head_dim] for keys and values.

Each sequence (batch row) has its own positions, so prompts of different lengths share one batch: a row
writes its keys at its own positions and a query at position p sees keys 0..p of its row. Entries past p
(padding, or a sequence that was reset) are never visible, so no clearing is needed between uses of a row.
"""

from __future__ import annotations

import torch
from torch import nn


class KVCache(nn.Module):
    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        shape = (num_layers, batch_size, num_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.max_len = max_len

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    def update(
        self, layer: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, H, T, D] at positions [B, T] of rows 0..B-1; return those rows' whole key and value
        buffers [B, H, max_len, D]."""
        keys, values = self.k[layer, : k.shape[0]], self.v[layer, : k.shape[0]]
        idx = positions[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
        keys.scatter_(2, idx, k.to(keys.dtype))
        values.scatter_(2, idx, v.to(values.dtype))
        return keys, values

"""The model runner: forward passes over a KV cache whose rows are slots, one slot per running sequence.

Two entry points, both under inference_mode:
- `prefill(slot, ids)`: a whole prompt in one forward pass, writing its keys/values into the slot's row;
- `decode(tokens, positions)`: one token for each of rows 0..n-1 in one forward pass ([n, 1] inputs, static
  shapes for a given n and attention span, so a backend may capture it in a CUDA graph).

Attention only spans the cache positions in use, rounded up to ATTENTION_BLOCK, so a short sequence in a long
context does not pay for the whole context at every step.
"""

from __future__ import annotations

import torch

from ..models import KVCache, Transformer

ATTENTION_BLOCK = 256


class CacheView:
    """Rows and leading positions of a KVCache, as a cache the model can drive: writes go to the big cache."""

    update = KVCache.update  # the same write as KVCache's, on views of its buffers

    def __init__(self, cache: KVCache, rows: slice, length: int) -> None:
        self.k = cache.k[:, rows, :, :length]
        self.v = cache.v[:, rows, :, :length]
        self.max_len = length


class ModelRunner:
    def __init__(self, model: Transformer, max_model_len: int) -> None:
        self.model = model
        self.max_model_len = max_model_len
        self.cache: KVCache | None = None

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def num_slots(self) -> int:
        return 0 if self.cache is None else self.cache.batch_size

    def reserve(self, slots: int) -> None:
        """Make room for `slots` sequences, keeping what the cache already holds."""
        if slots <= self.num_slots:
            return
        cache = self.new_cache(slots)
        if self.cache is not None:
            cache.k[:, : self.num_slots].copy_(self.cache.k)
            cache.v[:, : self.num_slots].copy_(self.cache.v)
        self.cache = cache

    def new_cache(self, slots: int) -> KVCache:
        return self.model.new_cache(slots, self.max_model_len)

    def span(self, length: int) -> int:
        """Cache positions attention covers for sequences of up to `length` tokens."""
        return min(self.max_model_len, -(-length // ATTENTION_BLOCK) * ATTENTION_BLOCK)

    @torch.inference_mode()
    def prefill(self, slot: int, ids: list[int]) -> torch.Tensor:
        """Run a prompt in the slot's cache row; the logits [V] (float32) after its last token."""
        assert self.cache is not None and slot < self.num_slots
        view = CacheView(self.cache, slice(slot, slot + 1), self.span(len(ids)))
        input_ids = torch.tensor([ids], device=self.device)
        positions = torch.arange(len(ids), device=self.device)[None]
        return self.model(input_ids, positions, view, last_only=True)[0, -1]

    @torch.inference_mode()
    def decode(self, tokens: list[int], positions: list[int]) -> torch.Tensor:
        """Feed tokens[i] at positions[i] to the sequence in slot i, for slots 0..n-1; the logits [n, V]."""
        assert self.cache is not None and len(tokens) <= self.num_slots
        view = CacheView(self.cache, slice(0, len(tokens)), self.span(max(positions) + 1))
        input_ids = torch.tensor(tokens, device=self.device)[:, None]
        pos = torch.tensor(positions, device=self.device)[:, None]
        return self.model(input_ids, pos, view)[:, 0]

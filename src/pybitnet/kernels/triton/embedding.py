"""Token embedding lookup as a kernel with programmatic dependent launch.

torch's embedding kernel cannot take part in dependent launch: in a captured decode step it starts only once
the previous step's argmax has finished, and the first q/k/v projection, launched only once the lookup has
finished, loses the head start on its weight reads that every other projection gets (common.PDL). This one
passes its gate first, so the projection after it launches at once; the lookup itself is a copy of one row
per token.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import launch_kwargs, pdl_gate, pdl_launch

BLOCK = 1024  # columns a program copies


@triton.jit
def _embedding_kernel(tok_ptr, table_ptr, out_ptr, V, H, stride_t, stride_o, BLOCK: tl.constexpr,
                      PDL: tl.constexpr):  # fmt: skip
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    pdl_gate(PDL)  # the token comes from the kernel before (the previous step's argmax)
    tok = tl.load(tok_ptr + row + cols * 0).to(tl.int64)  # the row's id in every lane
    ok = (cols < H) & (tok >= 0) & (tok < V)  # an id outside the table reads nothing (callers validate ids)
    vals = tl.load(table_ptr + tok * stride_t + cols, mask=ok, other=0.0)
    tl.store(out_ptr + row.to(tl.int64) * stride_o + cols, vals, mask=cols < H)


def embedding(tokens: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """table[tokens] for tokens [B] (integer ids) and table [V, H] -> [B, H], as F.embedding."""
    if tokens.dim() != 1 or table.dim() != 2 or table.stride(1) != 1:
        raise ValueError("embedding takes tokens [B] and a table [V, H] with contiguous rows")
    b, (v, h) = tokens.shape[0], table.shape
    out = torch.empty((b, h), dtype=table.dtype, device=table.device)
    if b:
        _embedding_kernel[(b, triton.cdiv(h, BLOCK))](
            tokens, table, out, v, h, table.stride(0), out.stride(0), BLOCK=BLOCK,
            **launch_kwargs(pdl_launch(table)),
        )  # fmt: skip
    return out

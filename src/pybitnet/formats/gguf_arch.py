"""What GGUF export and import share: architecture names, tensor names and llama.cpp's Q/K row order.

- llama-style ternary models are the `llama` architecture (mainline llama.cpp runs it with TQ weights).
  llama.cpp rotates adjacent pairs (2i, 2i+1) there, so q_proj/k_proj rows are stored permuted from HF's
  rotate-half order, exactly as llama.cpp's convert_hf_to_gguf.py (LlamaModel.permute) does.
- 2B-4T-style models are `bitnet-b1.58` (bitnet.cpp; relu², sub-norms). That graph uses rotate-half (NEOX)
  RoPE, as Microsoft's converter writes q/k unpermuted. `bitnet-25` is its older name.
"""

from __future__ import annotations

import torch

ARCH_LLAMA = "llama"
ARCH_BITNET = "bitnet-b1.58"
BITNET_ARCHES = (ARCH_BITNET, "bitnet-25")

# Our module path (below layers.{i}) -> the GGUF tensor name (below blk.{i})
_BLOCK_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.attn_sub_norm": "attn_sub_norm",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "mlp.ffn_sub_norm": "ffn_sub_norm",
}
_TOP_NAMES = {"embed_tokens": "token_embd", "norm": "output_norm", "lm_head": "output"}


def gguf_tensor_name(name: str) -> str:
    """Our parameter name -> the GGUF one: `layers.3.self_attn.q_proj.weight` -> `blk.3.attn_q.weight`,
    `embed_tokens.weight` -> `token_embd.weight` (KeyError for names GGUF files do not hold)."""
    module, _, param = name.rpartition(".")
    if module in _TOP_NAMES:
        return f"{_TOP_NAMES[module]}.{param}"
    parts = module.split(".", 2)
    if len(parts) == 3 and parts[0] == "layers" and parts[2] in _BLOCK_NAMES:
        return f"blk.{parts[1]}.{_BLOCK_NAMES[parts[2]]}.{param}"
    raise KeyError(f"no GGUF name for {name!r}")


def rope_permuted(arch: str, module_name: str) -> bool:
    return arch == ARCH_LLAMA and module_name.endswith(("self_attn.q_proj", "self_attn.k_proj"))


def permute_rows(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF rotate-half row order -> llama.cpp's interleaved order: in each head, row i of the first half and
    row i of the second half become rows 2i and 2i+1 (LlamaModel.permute)."""
    return t.reshape(n_heads, 2, t.shape[0] // n_heads // 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


def unpermute_rows(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of `permute_rows`."""
    return t.reshape(n_heads, t.shape[0] // n_heads // 2, 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)

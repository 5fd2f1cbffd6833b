"""The ternary decoder-only transformer, for every supported family (see ModelConfig.family).

Module names follow the HF checkpoints (self_attn.q_proj, mlp.gate_proj, ...) so weights map one to one.
`forward(input_ids, positions, cache)` is the interface the engine drives: positions are per sequence, so a
batch may hold prompts of different lengths.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import ConfigError
from ..kernels import cpu as cpu_kernels
from ..kernels.cpu_decoder import NativeDecoder
from ..kernels.cpu_head import HeadRows, Int4Head, Int8Head
from ..nn import PackedBitLinear, RMSNorm
from ..nn.bitlinear import fused_linears
from .config import ModelConfig
from .kv_cache import KVCache

# (in_features, out_features) -> a ternary linear module (training BitLinear or inference PackedBitLinear)
LinearFactory = Callable[[int, int], nn.Module]
DECODE_ATTENTION_MAX_T = 4  # new tokens per sequence up to which cached attention runs in C on CPU
HEAD_ENV = "PYBITNET_LM_HEAD"  # one of HEAD_MODES: the output head's default mode
HEAD_MODES = ("auto", "int8", "int4", "float")
# what a training forward recomputes in the backward instead of keeping: nothing, each block's feed-forward
# (its gate and up outputs are the largest activations of a layer), or each whole block
CHECKPOINTING = ("none", "mlp", "block")


def runs_native_cpu_kernels(model: nn.Module) -> bool:
    """Whether the C kernels (the "cpu_i2" layout) run `model`'s ternary layers."""
    layer = next((m for m in model.modules() if isinstance(m, PackedBitLinear)), None)
    return layer is not None and layer.kernel.layout == "cpu_i2"


def rope_inv_freq(config: ModelConfig, device: torch.device | str | None = None) -> torch.Tensor:
    dim = config.head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    inv_freq = 1.0 / (config.rope_theta**exponents)
    scaling = config.rope_scaling or {}
    if scaling.get("rope_type") != "llama3":
        return inv_freq
    # Llama 3.1 frequency scaling: long wavelengths slowed by `factor`, short kept, a smooth blend between.
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * torch.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, blended, scaled)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE: pairs (i, i + d/2). x [B, H, T, D]; cos, sin [B, T, D]."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, linear: LinearFactory) -> None:
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv_heads, self.head_dim = (
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        )
        hidden, q_dim, kv_dim = (
            config.hidden_size,
            self.n_heads * self.head_dim,
            self.n_kv_heads * self.head_dim,
        )
        self.q_proj = linear(hidden, q_dim)
        self.k_proj = linear(hidden, kv_dim)
        self.v_proj = linear(hidden, kv_dim)
        self.o_proj = linear(q_dim, hidden)
        self.attn_sub_norm = RMSNorm(q_dim, config.rms_norm_eps) if config.sub_norms else None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        positions: torch.Tensor | None,
        cache: KVCache | None,
        norm: RMSNorm | None = None,
    ) -> torch.Tensor:
        """`norm`, when given, is applied to x first (fused with the projections' activation quantization).
        positions None: no cache, every row at 0..T-1."""
        b, t, _ = x.shape
        q, k, v = fused_linears(x, (self.q_proj, self.k_proj, self.v_proj), norm)
        if cache is not None and t <= DECODE_ATTENTION_MAX_T and self._native_attention(q, k, v, cache):
            y = cpu_kernels.decode_attention(
                q,
                k,
                v,
                cos,
                sin,
                cache.k[self.layer],
                cache.v[self.layer],
                positions,
                self.n_heads,
                self.head_dim**-0.5,
            )
            return fused_linears(y, (self.o_proj,), self.attn_sub_norm)[0]
        q = q.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        mask = None  # positions None: rows at 0..T-1 and no cache, plain causal attention (no mask tensor)
        if positions is not None:
            if cache is None:
                key_pos = positions
            else:
                k, v = cache.update(self.layer, positions, k, v)
                key_pos = torch.arange(cache.max_len, device=x.device).expand(b, -1)
            mask = key_pos[:, None, None, :] <= positions[:, None, :, None]  # [B, 1, T, S]: causal per row
        k, v = k.to(q.dtype), v.to(q.dtype)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True)
        y = y.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim)
        return fused_linears(y, (self.o_proj,), self.attn_sub_norm)[0]

    def _native_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache) -> bool:
        """Decode steps of models on the C kernels run RoPE, the cache write and attention in one C call:
        the ~25 small torch ops it replaces (SDPA alone: ~0.1 ms for one query row) outweigh the GEMVs."""
        return (
            getattr(self.q_proj, "layout", None) == "cpu_i2"
            and cpu_kernels.native_available()
            and isinstance(getattr(cache, "k", None), torch.Tensor)
            and cpu_kernels.attention_fits(q, k, v, cache.k[self.layer])
        )


class FeedForward(nn.Module):
    def __init__(self, config: ModelConfig, linear: LinearFactory) -> None:
        super().__init__()
        self.gate_proj = linear(config.hidden_size, config.intermediate_size)
        self.up_proj = linear(config.hidden_size, config.intermediate_size)
        self.down_proj = linear(config.intermediate_size, config.hidden_size)
        self.ffn_sub_norm = (
            RMSNorm(config.intermediate_size, config.rms_norm_eps) if config.sub_norms else None
        )
        self.relu2 = config.hidden_act == "relu2"

    def forward(self, x: torch.Tensor, norm: RMSNorm | None = None) -> torch.Tensor:
        """`norm`, when given, is applied to x first (fused with gate/up's activation quantization)."""
        gate, up = fused_linears(x, (self.gate_proj, self.up_proj), norm)
        h = (F.relu(gate).square() if self.relu2 else F.silu(gate)) * up
        return fused_linears(h, (self.down_proj,), self.ffn_sub_norm)[0]


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, linear: LinearFactory) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer, linear)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = FeedForward(config, linear)
        self.checkpointing = "none"  # one of CHECKPOINTING; see set_activation_checkpointing

    def forward(self, x, cos, sin, positions, cache):
        mode = self.checkpointing if self.training and torch.is_grad_enabled() else "none"
        if mode == "block":
            return checkpoint(self._forward, x, cos, sin, positions, cache, False, use_reentrant=False)
        return self._forward(x, cos, sin, positions, cache, mode == "mlp")

    def _forward(self, x, cos, sin, positions, cache, recompute_mlp: bool):
        h = x + self.self_attn(x, cos, sin, positions, cache, norm=self.input_layernorm)
        if recompute_mlp:
            return h + checkpoint(self.mlp, h, self.post_attention_layernorm, use_reentrant=False)
        return h + self.mlp(h, norm=self.post_attention_layernorm)


def set_activation_checkpointing(model: nn.Module, mode: str) -> None:
    """Recompute activations in the backward instead of keeping them (activation checkpointing), in training
    forwards: "mlp" each block's feed-forward (the most memory for the least recomputation), "block" each
    whole block (only the blocks' inputs are kept), "none" keeps everything."""
    if mode not in CHECKPOINTING:
        raise ConfigError(f"activation checkpointing must be one of {', '.join(CHECKPOINTING)}, got {mode!r}")
    for m in model.modules():
        if isinstance(m, Block):
            m.checkpointing = mode


def _building_on_meta() -> bool:
    return torch.empty(0).device.type == "meta"


def _real_device() -> str | None:
    # Some ops on meta tensors (normal_, the RoPE frequencies) make torch import torch._dynamo, which costs
    # ~150 MB of resident memory; a skeleton built on meta (how checkpoints are loaded) avoids them.
    return "cpu" if _building_on_meta() else None


def _embedding(vocab_size: int, hidden_size: int) -> nn.Embedding:
    # On meta skip the random init (see _real_device); the checkpoint's weights replace it anyway.
    if _building_on_meta():
        return nn.Embedding(vocab_size, hidden_size, _weight=torch.empty(vocab_size, hidden_size))
    return nn.Embedding(vocab_size, hidden_size)


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig, linear: LinearFactory) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = _embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i, linear) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # a tied head shares the embeddings, so its own weight is never allocated
        head_device = "meta" if config.tie_word_embeddings else None
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False, device=head_device)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.head_mode: str | None = None  # None: $PYBITNET_LM_HEAD, else "auto"; see int8_head()
        self.lm_head_int8: Int8Head | None = None
        self.register_buffer("inv_freq", rope_inv_freq(config, _real_device()), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        # the final norm's, not the embeddings': a loader may keep a 16-bit embedding table in a float32 model
        return self.norm.weight.dtype

    def new_cache(
        self, batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None
    ) -> KVCache:
        c = self.config
        max_len = max_len or c.max_position_embeddings
        return KVCache(
            c.num_hidden_layers,
            batch_size,
            c.num_key_value_heads,
            max_len,
            c.head_dim,
            dtype or self.cache_dtype,
            self.device,
        )

    @property
    def cache_dtype(self) -> torch.dtype:
        """bfloat16 where the C decoder runs the layers (half the bytes of float32; it widens keys and values
        exactly and computes in float32; float32's range, so no key or value overflows as in float16), else
        the compute dtype."""
        native = self.device.type == "cpu" and NativeDecoder.supports(self) is not None
        return torch.bfloat16 if native else self.compute_dtype

    @property
    def compute_dtype(self) -> torch.dtype:
        """Activations run in the embeddings' dtype, except fp16, which relu² overflows: then float32."""
        return torch.float32 if self.dtype == torch.float16 else self.dtype

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[..., None].float() * self.inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(self.compute_dtype), emb.sin().to(self.compute_dtype)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, vocab] (float32). Without a cache, positions default to 0..T-1.
        `last_only` computes logits for the last position of each row only ([B, 1, vocab])."""
        # without a cache and positions every row runs at 0..T-1: the blocks get None, so attention runs
        # plain causal (flash kernels, no [B, 1, T, T] mask built and kept for the backward)
        causal = positions is None and cache is None
        if positions is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand(
                input_ids.shape[0], -1
            )
        x = self.embed_tokens(input_ids).to(self.compute_dtype)
        cos, sin = self.rope(positions)
        native = None if cache is None else NativeDecoder.for_model(self)
        if native is not None and native.fits(x, cache):  # all layers in one C call (same math, float32)
            x = native(x, cos, sin, positions, cache, reuse_input=True)  # x is this forward's own
        else:
            for block in self.layers:
                x = block(x, cos, sin, None if causal else positions, cache)
        if last_only:
            x = x[:, -1:]
        head = self.int8_head()
        if head is not None:
            return head(x, self.norm)
        x = self.norm(x)
        return F.linear(x.to(self.lm_head.weight.dtype), self.lm_head.weight).float()

    def int8_head(self) -> Int8Head | None:
        """The int8 per-row copy of the output head, made on first use, when `head_mode` is "int8", or "auto"
        (the default, also set by $PYBITNET_LM_HEAD) on CPU with the C kernels; a 4-bit one for "int4"; None
        means the float head."""
        return self._int8_head(self.lm_head.weight, native_linears=None)

    def build_int8_head(self, rows: HeadRows) -> None:
        """Make the int8 head now, for a model whose ternary linears will run on the C kernels, if its mode
        wants one. `rows` holds the head weight's values ([r0:r1] gives those rows as a float tensor of the
        model's dtype): loaders pass rows read from the file, so the head's float pages need not become
        resident, and call this before repacking the linears, so the two copies' temporaries never add up."""
        self._int8_head(rows, native_linears=True)

    def _int8_head(self, rows: HeadRows, native_linears: bool | None) -> Int8Head | None:
        mode = self.head_mode or os.environ.get(HEAD_ENV, "auto")
        if mode not in HEAD_MODES:
            raise ConfigError(f"lm_head mode must be one of {', '.join(HEAD_MODES)}, got {mode!r}")
        if mode == "float" or self.lm_head.weight.device.type != "cpu" or not cpu_kernels.native_available():
            self.lm_head_int8 = None
            return None
        if native_linears is None:
            native_linears = runs_native_cpu_kernels(self)
        if mode == "auto" and not native_linears:
            return None
        head_type = Int4Head if mode == "int4" else Int8Head  # int4: opt-in, half the bytes, less exact
        if type(self.lm_head_int8) is not head_type:
            self.lm_head_int8 = head_type.from_float(rows)
        return self.lm_head_int8

"""GGUF file -> Transformer: llama (llama.cpp) and bitnet-b1.58 (bitnet.cpp) models with TQ1_0, TQ2_0, I2_S or
ternary-valued float weights. The inverse of gguf_export, and the reader of bitnet.cpp's I2_S files.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType
from torch import nn

from ..errors import ConfigError, LayoutError, UnsupportedModelError, WeightsError
from ..kernels import Kernel
from ..models import ModelConfig, Transformer
from ..models.transformer import rope_inv_freq
from ..nn import PackedBitLinear
from ..quant import TernaryWeight, pack, quantize_weight
from ..quant.layouts.gguf_tq import unpack_tq_bytes
from ..quant.layouts.i2s import unpack_i2s_bytes
from .gguf_arch import ARCH_LLAMA, BITNET_ARCHES, gguf_tensor_name, rope_permuted, unpermute_rows
from .gguf_file import I2_S, GGUFFile
from .memory import LOOKED_UP, FileRows, advise_random_reads, release_freed_heap

_FLOAT_TYPES = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16)
_TQ_LAYOUTS = {GGMLQuantizationType.TQ2_0: "tq2_0", GGMLQuantizationType.TQ1_0: "tq1_0"}


def _meta(f: GGUFFile, key: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
    value = f.metadata.get(key, default)
    if value is None:
        raise ConfigError(f"{f.path} lacks the metadata key {key!r}")
    if not isinstance(value, kind) or isinstance(value, bool) != (kind is bool):
        raise ConfigError(f"{f.path}: metadata {key!r} has the wrong type ({type(value).__name__})")
    return value


def config_from_gguf(f: GGUFFile) -> ModelConfig:
    """The ModelConfig that a GGUF file's metadata (and tensor directory) describes."""
    arch = f.architecture
    if arch == ARCH_LLAMA:
        family, act, theta = "llama", "silu", 10000.0
    elif arch in BITNET_ARCHES:
        family, act, theta = "bitnet", "relu2", 500000.0
    else:
        raise UnsupportedModelError(
            f"{f.path}: GGUF architecture {arch!r} is not a ternary model pybitnet reads "
            f"(llama or {', '.join(BITNET_ARCHES)})"
        )

    def key(name: str, kind: type | tuple[type, ...] = int, default: Any = None) -> Any:
        return _meta(f, f"{arch}.{name}", kind, default)

    hidden = key("embedding_length")
    heads = key("attention.head_count")
    if hidden <= 0 or heads <= 0:
        raise ConfigError(f"{f.path}: embedding_length {hidden} and head_count {heads} must be positive")
    head_dim = key("attention.key_length", int, hidden // heads)
    rope_dim = key("rope.dimension_count", int, head_dim)
    if rope_dim != head_dim:
        raise UnsupportedModelError(
            f"{f.path}: partial RoPE ({rope_dim} of {head_dim} dims) is not supported"
        )
    scaling = f.metadata.get(f"{arch}.rope.scaling.type", "none")
    if scaling not in ("none", "linear") or key("rope.scaling.factor", (int, float), 1.0) != 1.0:
        raise UnsupportedModelError(f"{f.path}: RoPE scaling {scaling!r} is not supported")
    eos = f.metadata.get("tokenizer.ggml.eos_token_id")
    eot = f.metadata.get("tokenizer.ggml.eot_token_id")
    try:
        config = ModelConfig(
            family=family,
            vocab_size=key("vocab_size", int, f.info("token_embd.weight").shape[0]),
            hidden_size=hidden,
            intermediate_size=key("feed_forward_length"),
            num_hidden_layers=key("block_count"),
            num_attention_heads=heads,
            num_key_value_heads=key("attention.head_count_kv", int, heads),
            head_dim=head_dim,
            max_position_embeddings=key("context_length"),
            rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", (int, float))),
            rope_theta=float(key("rope.freq_base", (int, float), theta)),
            hidden_act=act,
            tie_word_embeddings="output.weight" not in f.tensors,
            linear_class="autobitlinear" if family == "bitnet" else "bitlinear",
            bos_token_id=f.metadata.get("tokenizer.ggml.bos_token_id"),
            eos_token_id=[eos, eot] if eot is not None and eos is not None and eot != eos else eos,
            pad_token_id=f.metadata.get("tokenizer.ggml.padding_token_id"),
        )
    except (TypeError, ValueError, ZeroDivisionError) as e:
        raise ConfigError(f"{f.path}: inconsistent model metadata: {e}") from None
    _check_against_tensors(f, config)
    return config


def _check_against_tensors(f: GGUFFile, c: ModelConfig) -> None:
    """The metadata must describe the tensors the file holds (which also bounds every size by the file's)."""
    expected = {
        "token_embd.weight": (c.vocab_size, c.hidden_size),
        "blk.0.attn_q.weight": (c.num_attention_heads * c.head_dim, c.hidden_size),
        "blk.0.attn_k.weight": (c.num_key_value_heads * c.head_dim, c.hidden_size),
        "blk.0.ffn_up.weight": (c.intermediate_size, c.hidden_size),
        f"blk.{c.num_hidden_layers - 1}.attn_norm.weight": (c.hidden_size,),
    }
    for name, shape in expected.items():
        if f.info(name).shape != shape:
            raise WeightsError(
                f"{name} in {f.path} has shape {list(f.info(name).shape)}, but the metadata describes "
                f"{list(shape)}"
            )
    if f"blk.{c.num_hidden_layers}.attn_norm.weight" in f.tensors:
        raise WeightsError(f"{f.path} holds more blocks than its block_count ({c.num_hidden_layers})")


def _float_ternary(w: torch.Tensor) -> TernaryWeight:
    """A float-stored linear: exact codes and scale when its values are {-s, 0, s} (a ternary model saved as
    F16/F32), else the absmean ternarization of latent weights."""
    magnitudes = w.abs()
    nonzero = magnitudes[magnitudes > 0]
    if nonzero.numel() == 0:
        return TernaryWeight(torch.zeros(w.shape, dtype=torch.int8), torch.ones(()))
    if nonzero.min() == nonzero.max():
        return TernaryWeight(torch.sign(w).to(torch.int8), nonzero.max().float().reshape(()))
    return quantize_weight(w)


def read_ternary(f: GGUFFile, name: str, shape: tuple[int, int]) -> TernaryWeight:
    """The ternary weight `name` ([out, in]) in canonical form, whatever type the file stores it in."""
    t = f.info(name)
    if t.shape != shape:
        raise WeightsError(
            f"{name}: shape {list(t.shape)} in {f.path} does not match the metadata's {list(shape)}"
        )
    try:
        if t.type in _TQ_LAYOUTS:
            return unpack_tq_bytes(f.read_bytes(name), shape, _TQ_LAYOUTS[t.type])
        if t.type == I2_S:
            return unpack_i2s_bytes(f.read_bytes(name), shape)
    except LayoutError as e:
        raise WeightsError(f"{name} in {f.path}: {e}") from None
    if t.type in _FLOAT_TYPES:
        values = f.floats(name)
        if not np.isfinite(values).all():
            raise WeightsError(f"{name} in {f.path} holds non-finite values (corrupt data?)")
        return _float_ternary(torch.from_numpy(values.copy()))
    raise WeightsError(
        f"{name} in {f.path} is {t.type_name}; ternary weights must be TQ1_0, TQ2_0, I2_S or floating point"
    )


def _read_float(f: GGUFFile, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    t = f.info(name)
    if t.shape != shape:
        raise WeightsError(
            f"{name}: shape {list(t.shape)} in {f.path} does not match the metadata's {list(shape)}"
        )
    values = f.floats(name)
    if not np.isfinite(values).all():
        raise WeightsError(f"{name} in {f.path} holds non-finite values (corrupt data?)")
    if not values.flags.writeable:  # a view of the read-only map (F32): parameters get their own memory
        values = values.copy()
    return torch.from_numpy(values).to(dtype)


# rows per block when float tensors are read or checked with file I/O
ROW_BLOCK = 8192


def _mapped16(f: GGUFFile, name: str, shape: tuple[int, ...]) -> torch.Tensor | None:
    """An F16 or BF16 tensor as a view of the mapped file (no copy; nothing writes to it), its values checked
    finite a block of rows at a time through file reads, which leave no pages of it resident; None for other
    types."""
    view = f.view16(name)
    if view is None:
        return None
    if view.shape != shape:
        raise WeightsError(
            f"{name}: shape {list(view.shape)} in {f.path} does not match the metadata's {list(shape)}"
        )
    for r0 in range(0, shape[0], ROW_BLOCK):
        if not np.isfinite(f.read_rows(name, r0, r0 + ROW_BLOCK)).all():
            raise WeightsError(f"{name} in {f.path} holds non-finite values (corrupt data?)")
    with warnings.catch_warnings():  # torch warns about every read-only array
        warnings.simplefilter("ignore", UserWarning)
        t = torch.from_numpy(view)
    return t.view(torch.bfloat16) if view.dtype == np.uint16 else t


def _inv_freq(f: GGUFFile, config: ModelConfig) -> torch.Tensor:
    """RoPE frequencies; a rope_freqs tensor (llama.cpp's Llama 3.1 scaling) divides them per pair."""
    inv_freq = rope_inv_freq(config)
    if "rope_freqs.weight" not in f.tensors:
        return inv_freq
    factors = _read_float(f, "rope_freqs.weight", tuple(inv_freq.shape), torch.float32)
    if (factors <= 0).any():
        raise WeightsError(f"rope_freqs.weight in {f.path} holds a non-positive factor")
    return inv_freq / factors


def load_gguf_model(path: str | Path, kernel: Kernel, dtype: torch.dtype = torch.float32) -> Transformer:
    """Build the Transformer a GGUF file holds, every ternary linear packed once for `kernel`."""
    f = GGUFFile(path)
    config = config_from_gguf(f)
    arch = f.architecture
    heads = {"self_attn.q_proj": config.num_attention_heads, "self_attn.k_proj": config.num_key_value_heads}
    with torch.device("meta"):
        model = Transformer(config, lambda i, o: nn.Linear(i, o, bias=False))
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name != "lm_head":
            tw = read_ternary(
                f, gguf_tensor_name(name + ".weight"), (module.out_features, module.in_features)
            )
            if rope_permuted(arch, name):
                n = next(h for k, h in heads.items() if name.endswith(k))
                tw = TernaryWeight(
                    unpermute_rows(tw.codes, n),
                    tw.scale if tw.scale.ndim == 0 else unpermute_rows(tw.scale, n),
                )
            # straight into the kernel's layout: no detour through another packed form
            model.set_submodule(name, PackedBitLinear.from_packed(pack(tw, kernel.layout), kernel))
            del tw
            release_freed_heap()  # the file's bytes and the canonical codes are temporaries
    # 16-bit tables stay as stored (see LOOKED_UP), each lookup widening the rows it reads (the same values)
    native_cpu = kernel.layout == "cpu_i2" and dtype == torch.float32
    for name, param in list(model.named_parameters()):
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        mapped = None
        if native_cpu and name in LOOKED_UP:
            mapped = _mapped16(f, gguf_tensor_name(name), tuple(param.shape))
        if mapped is not None and name == "embed_tokens.weight":
            advise_random_reads(mapped)
        tensor = (
            mapped
            if mapped is not None
            else _read_float(f, gguf_tensor_name(name), tuple(param.shape), dtype)
        )
        module_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(module_name), attr, nn.Parameter(tensor, requires_grad=False))
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    if kernel.layout == "cpu_i2":
        head = gguf_tensor_name("embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight")
        model.build_int8_head(FileRows(f, head, f.info(head).shape, dtype))
    model.register_buffer("inv_freq", _inv_freq(f, config), persistent=False)
    return model.eval()

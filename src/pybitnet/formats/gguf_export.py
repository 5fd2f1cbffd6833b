"""Transformer -> GGUF file with TQ2_0 / TQ1_0 ternary weights, for llama.cpp (llama) and bitnet.cpp
(bitnet-b1.58). See gguf_arch for the architecture choice and the Q/K row order.

Ternary linears are packed bit-exactly as the gguf package quantizes their dequantized values; norms are F32,
token embeddings (and an untied output head) F16 or Q8_0.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFWriter, LlamaFileType
from gguf.quants import quantize

from ..errors import LayoutError, UnsupportedModelError
from ..kernels import get_kernel
from ..models import Transformer
from ..models.config import ModelConfig
from ..models.transformer import rope_inv_freq
from ..nn import PackedBitLinear
from ..quant import TernaryWeight, pack
from ..quant.layouts.gguf_tq import QK
from .gguf_arch import ARCH_BITNET, ARCH_LLAMA, gguf_tensor_name, permute_rows, rope_permuted
from .gguf_tokenizer import add_tokenizer
from .hf import load_hf_model

WEIGHT_TYPES = {
    "tq2_0": (GGMLQuantizationType.TQ2_0, LlamaFileType.MOSTLY_TQ2_0),
    "tq1_0": (GGMLQuantizationType.TQ1_0, LlamaFileType.MOSTLY_TQ1_0),
}
EMBED_TYPES = {"f16": GGMLQuantizationType.F16, "q8_0": GGMLQuantizationType.Q8_0}


def gguf_architecture(config: ModelConfig) -> str:
    if config.family == "llama":
        return ARCH_LLAMA
    if config.family == "bitnet":
        return ARCH_BITNET
    raise UnsupportedModelError(
        f"GGUF export covers llama-style ternary models (llama.cpp's llama) and 2B-4T-style models "
        f"(bitnet.cpp's bitnet-b1.58); model family {config.family!r} has no matching GGUF architecture"
    )


def _ternary_linears(model: Transformer) -> list[tuple[str, PackedBitLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, PackedBitLinear)]


def check_exportable(model: Transformer) -> str:
    """The GGUF architecture for `model`, after checking every ternary linear fits a TQ layout."""
    arch = gguf_architecture(model.config)
    for name, module in _ternary_linears(model):
        if module.input_norm is not None:
            raise UnsupportedModelError(
                f"{name} has an RMSNorm inside BitLinear (quantization_config.use_rms_norm); "
                "llama.cpp's graphs have no such norm, so this model cannot be exported to GGUF"
            )
        if module.in_features % QK:
            raise LayoutError(
                f"cannot export {gguf_tensor_name(name + '.weight')} ({name}, {module.out_features}x"
                f"{module.in_features}) as TQ1_0/TQ2_0: its in_features {module.in_features} is not a "
                f"multiple of {QK}"
            )
    return arch


def _write_config(writer: GGUFWriter, config: ModelConfig, name: str, file_type: LlamaFileType) -> None:
    writer.add_name(name)
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_rope_dimension_count(config.head_dim)
    if config.head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
    writer.add_file_type(file_type)
    writer.add_quantization_version(2)


def _rope_factors(model: Transformer) -> np.ndarray | None:
    """llama.cpp's rope_freqs tensor (base frequency / used frequency per pair), or None when unscaled."""
    config = ModelConfig(**{**model.config.to_dict(), "rope_scaling": None})
    factors = rope_inv_freq(config).float() / model.inv_freq.float().cpu()
    return None if torch.allclose(factors, torch.ones_like(factors)) else factors.numpy()


def _ternary_bytes(tw: TernaryWeight, layout: str, n_heads: int | None) -> np.ndarray:
    if n_heads is not None:
        scale = tw.scale if tw.scale.ndim == 0 else permute_rows(tw.scale, n_heads)
        tw = TernaryWeight(permute_rows(tw.codes, n_heads), scale)
    return pack(tw, layout).data.numpy()


def _float_tensor(t: torch.Tensor, qtype: GGMLQuantizationType) -> tuple[np.ndarray, GGMLQuantizationType]:
    values = t.detach().float().cpu().numpy()
    if qtype == GGMLQuantizationType.F16:
        return values.astype(np.float16), qtype
    if qtype == GGMLQuantizationType.Q8_0:
        if values.shape[-1] % 32:
            raise LayoutError(f"Q8_0 needs rows that are a multiple of 32 values, got {values.shape[-1]}")
        return quantize(values, qtype), qtype
    return values.astype(np.float32), GGMLQuantizationType.F32


def save_gguf(
    model: Transformer,
    path: str | Path,
    tokenizer_dir: str | Path,
    weight_type: str = "tq2_0",
    embed_type: str = "f16",
    name: str | None = None,
) -> Path:
    """Write `model` as a GGUF file: ternary linears in `weight_type` (tq2_0 | tq1_0), token embeddings and an
    untied output head in `embed_type` (f16 | q8_0), norms F32, tokenizer and chat template from
    `tokenizer_dir` (tokenizer.json, tokenizer_config.json)."""
    if weight_type not in WEIGHT_TYPES:
        raise LayoutError(
            f"unknown GGUF weight type {weight_type!r}; choose one of {', '.join(WEIGHT_TYPES)}"
        )
    if embed_type not in EMBED_TYPES:
        raise LayoutError(f"unknown embedding type {embed_type!r}; choose one of {', '.join(EMBED_TYPES)}")
    arch = check_exportable(model)
    config = model.config
    path = Path(path)
    qtype, file_type = WEIGHT_TYPES[weight_type]
    writer = GGUFWriter(path, arch)
    _write_config(writer, config, name or path.stem, file_type)
    add_tokenizer(writer, Path(tokenizer_dir), config.vocab_size)

    linears = dict(_ternary_linears(model))
    kv_heads = {
        "self_attn.q_proj": config.num_attention_heads,
        "self_attn.k_proj": config.num_key_value_heads,
    }
    for module_name, module in linears.items():
        heads = next((h for k, h in kv_heads.items() if module_name.endswith(k)), None)
        n_heads = heads if rope_permuted(arch, module_name) else None
        data = _ternary_bytes(module.ternary(), weight_type, n_heads)
        writer.add_tensor(gguf_tensor_name(module_name + ".weight"), data, raw_dtype=qtype)
    for param_name, param in model.named_parameters(remove_duplicate=True):
        matrix = param_name in ("embed_tokens.weight", "lm_head.weight")
        data, dtype = _float_tensor(param, EMBED_TYPES[embed_type] if matrix else GGMLQuantizationType.F32)
        writer.add_tensor(gguf_tensor_name(param_name), data, raw_dtype=dtype)
    if (factors := _rope_factors(model)) is not None:
        writer.add_tensor("rope_freqs.weight", factors.astype(np.float32))

    path.parent.mkdir(parents=True, exist_ok=True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def convert_hf_to_gguf(
    model_dir: str | Path, path: str | Path, weight_type: str = "tq2_0", embed_type: str = "f16"
) -> Path:
    """Convert a HF checkpoint directory (packed or latent BitNet weights + tokenizer) to a GGUF file."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise UnsupportedModelError(
            f"{model_dir} is not a HF checkpoint directory (config.json + safetensors)"
        )
    model = load_hf_model(model_dir, get_kernel("reference"), torch.float32)
    check_exportable(model)
    return save_gguf(model, path, model_dir, weight_type, embed_type, name=model_dir.name)

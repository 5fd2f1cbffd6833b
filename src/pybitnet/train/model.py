"""The model a run trains: a preset from scratch, a BitNet checkpoint, or a full-precision llama-style
checkpoint converted to ternary; and its export as an HF packed checkpoint plus the bf16 master.

Training always runs on pybitnet's Transformer with training-form BitLinear layers (or nn.Linear for the
full-precision twin), so every source ends up in one module tree that exports the same way.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..convert import to_bitnet
from ..errors import ConfigError, UnsupportedModelError
from ..formats.config_json import read_json
from ..formats.hf import _checkpoint_name, read_ternary, save_hf_model
from ..formats.safetensors_io import TensorReader
from ..models import ModelConfig, Transformer
from ..models.presets import preset
from ..nn import BitLinear
from ..quant import unpack

INIT_STD = 0.02
FP_MODEL_TYPES = ("llama", "mistral")


def linear_factory(config: ModelConfig, quantize: bool):
    if not quantize:
        return lambda i, o: nn.Linear(i, o, bias=False)
    return lambda i, o: BitLinear(i, o, input_norm=config.use_rms_norm, norm_eps=config.linear_norm_eps)


def init_model(config: ModelConfig, quantize: bool, seed: int) -> Transformer:
    """A fresh model: N(0, 0.02) linears and embeddings, residual outputs scaled by 1/sqrt(2 * layers)
    (GPT-2), norms at 1."""
    torch.manual_seed(seed)
    model = Transformer(config, linear_factory(config, quantize))
    residual_std = INIT_STD / (2 * config.num_hidden_layers) ** 0.5
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                p.normal_(0.0, residual_std)
            else:
                p.normal_(0.0, INIT_STD)
    return model


def model_config(cfg_preset: str, overrides: dict[str, Any]) -> ModelConfig:
    try:
        return preset(cfg_preset, **overrides)
    except TypeError as e:
        raise ConfigError(f"model_overrides: {e}") from None


def load_model_for_training(
    path: str | Path, quantize: bool, add_sub_norms: bool, exclude: list[str]
) -> Transformer:
    """A checkpoint directory as a trainable Transformer. BitNet checkpoints keep their ternary weights
    (packed ones dequantized into latent weights, latent ones as they are); a full-precision llama-style
    checkpoint is converted with `to_bitnet` (optionally adding the 2B-4T sub-norms)."""
    path = Path(path)
    raw = read_json(path / "config.json")
    try:
        config = ModelConfig.from_hf(raw)
        is_bitnet = True
    except UnsupportedModelError:
        config, is_bitnet = _fp_config(raw, add_sub_norms), False
    reader = TensorReader(path)
    model = Transformer(config, lambda i, o: nn.Linear(i, o, bias=False))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name == "lm_head.weight" and config.tie_word_embeddings:
                continue
            module_name = name.rpartition(".")[0]
            module = model.get_submodule(module_name)
            if is_bitnet and isinstance(module, nn.Linear) and module_name != "lm_head":
                shape = (module.out_features, module.in_features)
                latent = unpack(read_ternary(reader, _checkpoint_name(module_name, config), shape, config))
                param.copy_(latent.dequantize(torch.float32))
            elif not is_bitnet and ("attn_sub_norm" in name or "ffn_sub_norm" in name):  # added: gain 1
                param.fill_(1.0)
            else:
                param.copy_(_read(reader, _checkpoint_name(name, config), tuple(param.shape)))
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    if quantize:
        linear_norms = is_bitnet and config.use_rms_norm
        to_bitnet(
            model,
            exclude=exclude,
            sub_norms=linear_norms,
            sub_norm_layers=["*"],
            norm_eps=config.linear_norm_eps,
        )
        if linear_norms:
            _load_linear_norms(model, reader, config)
    return model


def _read(reader: TensorReader, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    from ..errors import WeightsError

    t = reader.get(name)
    if tuple(t.shape) != shape or not t.is_floating_point():
        raise WeightsError(
            f"{name}: expected a float tensor of shape {list(shape)}, got {t.dtype} {list(t.shape)}"
        )
    return t.float()


def _load_linear_norms(model: Transformer, reader: TensorReader, config: ModelConfig) -> None:
    """BitLinear input norms (quantization_config.use_rms_norm), stored as `<linear>.rms_norm.weight`."""
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, BitLinear) and m.input_norm is not None:
                stored = _checkpoint_name(f"{name}.rms_norm.weight", config)
                m.input_norm.weight.copy_(_read(reader, stored, (m.in_features,)))


def _fp_config(raw: dict[str, Any], add_sub_norms: bool) -> ModelConfig:
    """The ModelConfig of a full-precision llama-style transformers checkpoint, as a ternary model."""
    model_type = raw.get("model_type")
    if model_type not in FP_MODEL_TYPES:
        raise UnsupportedModelError(
            f"init_from: model_type {model_type!r} cannot be converted; supported full-precision types are "
            f"{', '.join(FP_MODEL_TYPES)} (or a BitNet checkpoint)"
        )
    if raw.get("attention_bias") or raw.get("mlp_bias"):
        raise UnsupportedModelError("init_from: models with biases in their linears are not supported")
    hf = dict(
        raw,
        model_type="llama",
        quantization_config={"quant_method": "bitnet", "linear_class": "autobitlinear"},
    )
    config = ModelConfig.from_hf(hf)
    if add_sub_norms:
        config = ModelConfig(**{**config.to_dict(), "family": "bitnet"})
    return config


def export(model: Transformer, out_dir: Path, tokenizer_dir: Path | None, quantized: bool) -> dict[str, Path]:
    """Write `out_dir/hf` (the HF packed checkpoint: pybitnet.load_model and transformers load it) and
    `out_dir/master` (the bf16 latent weights, to continue training from). A full-precision run writes only
    its master weights."""
    written = {}
    master = copy.deepcopy(model).to("cpu")
    if quantized:
        packed = copy.deepcopy(master)
        for name, m in list(packed.named_modules()):
            if isinstance(m, BitLinear):
                packed.set_submodule(name, m.to_packed(kernel="reference"))
        save_hf_model(packed, out_dir / "hf", tokenizer_dir)
        written["hf"] = out_dir / "hf"
        save_hf_model(master.to(torch.bfloat16), out_dir / "master", tokenizer_dir)
    else:
        from safetensors.torch import save_file

        (out_dir / "master").mkdir(parents=True, exist_ok=True)
        tensors = {
            k: v.detach().to(torch.bfloat16).contiguous().clone() for k, v in master.state_dict().items()
        }
        save_file(tensors, str(out_dir / "master" / "model.safetensors"))
        cfg = {"pybitnet_full_precision_twin": True, "model_config": master.config.to_dict()}
        (out_dir / "master" / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    written["master"] = out_dir / "master"
    return written

"""Full-precision -> BitNet b1.58: swap a model's nn.Linear layers for BitLinear, in place.

Works on transformers causal LMs (LlamaForCausalLM and the like) and on pybitnet's own Transformer. Embeddings
and the LM head stay full precision, as in BitNet. The converted model trains quantization-aware;
start it at `quant_strength=0` and raise λ to 1 over some steps (`set_quant_strength`, or the trainer's
quant_warmup_steps) so the loss does not restart from random-init level.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from fnmatch import fnmatchcase

import torch
from torch import nn

from .nn import BitLinear

DEFAULT_EXCLUDE = ("lm_head", "*embed*", "*.lm_head", "score")
SUB_NORM_LAYERS = ("o_proj", "down_proj")  # 2B-4T puts attn_sub_norm / ffn_sub_norm right before these


def _matches(name: str, patterns: Iterable[str]) -> bool:
    """fnmatch on the full module name, or equality with its last component (so "lm_head" just works)."""
    leaf = name.rsplit(".", 1)[-1]
    return any(fnmatchcase(name, p) or leaf == p for p in patterns)


def to_bitnet(
    model: nn.Module,
    *,
    exclude: Iterable[str] = DEFAULT_EXCLUDE,
    include: Iterable[str] | None = None,
    sub_norms: bool = False,
    sub_norm_layers: Iterable[str] = SUB_NORM_LAYERS,
    norm_eps: float | None = None,
    quant_strength: float = 1.0,
    act_quant_strength: float | None = None,
) -> nn.Module:
    """Replace every nn.Linear of `model` (except `exclude` patterns; only `include` ones when given) with a
    BitLinear holding the same weights as its latent weights. Returns `model`, changed in place.

    `sub_norms` adds the 2B-4T sub-norms: an RMSNorm (gain 1) on the input of each `sub_norm_layers` linear,
    which is where the 2B-4T architecture normalizes (attn_sub_norm before o_proj, ffn_sub_norm before
    down_proj). `quant_strength` / `act_quant_strength` set the initial λ for weights / activations: 0 keeps
    the model's full-precision outputs exactly, 1 is fully ternary weights and int8 activations.
    """
    include = list(include) if include is not None else None
    exclude, sub_norm_layers = list(exclude), list(sub_norm_layers)
    eps = norm_eps if norm_eps is not None else _config_eps(model)
    targets = [
        (name, m)
        for name, m in model.named_modules()
        if type(m) is nn.Linear
        and not _matches(name, exclude)
        and (include is None or _matches(name, include))
    ]
    for name, linear in targets:
        layer = BitLinear(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            input_norm=sub_norms and _matches(name, sub_norm_layers),
            norm_eps=eps,
            device=linear.weight.device,
            dtype=linear.weight.dtype,
        )
        with torch.no_grad():
            layer.weight.copy_(linear.weight)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        layer.weight.requires_grad_(linear.weight.requires_grad)
        model.set_submodule(name, layer)
    set_quant_strength(model, quant_strength, act_quant_strength)
    return model


def _config_eps(model: nn.Module) -> float:
    config = getattr(model, "config", None)
    return float(getattr(config, "rms_norm_eps", 1e-6) or 1e-6)


def bitlinear_layers(model: nn.Module) -> Iterator[BitLinear]:
    return (m for m in model.modules() if isinstance(m, BitLinear))


def set_quant_strength(model: nn.Module, weight: float, act: float | None = None) -> None:
    """Set λ (0 = full precision, 1 = fully quantized) of every BitLinear, for weights and activations.

    Writes into the existing buffers (no new tensors, no host sync): a compiled model does not recompile."""
    act = weight if act is None else act
    if not (0.0 <= weight <= 1.0 and 0.0 <= act <= 1.0):
        raise ValueError(f"quant strengths must lie in [0, 1], got weight {weight}, act {act}")
    for layer in bitlinear_layers(model):
        layer.quant_strength.fill_(weight)
        layer.act_quant_strength.fill_(act)

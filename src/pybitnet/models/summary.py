"""What a model is, without loading its weights: architecture, parameter counts, weight layout, bytes.

`pybitnet info` prints a `ModelSummary`; the formats fill in what the files say (layout, dtypes, sizes).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .config import ModelConfig
from .transformer import Transformer


@dataclass
class ModelSummary:
    path: Path
    file_format: str  # "safetensors" or "gguf"
    architecture: str  # as the files name it (BitNetForCausalLM, bitnet-b1.58, ...)
    config: ModelConfig
    ternary_params: int
    float_params: int
    layout: str  # how the ternary weights are stored
    files: dict[str, int] = field(default_factory=dict)  # file name -> bytes
    weight_bytes: int = 0  # bytes of the tensor files
    tensor_bytes: dict[str, int] = field(default_factory=dict)  # stored dtype / type -> bytes of tensors

    @property
    def total_bytes(self) -> int:
        return sum(self.files.values())

    @property
    def ternary_bits_per_weight(self) -> float | None:
        """Bits per ternary weight as stored (2 for HF packed, 16 for bf16 latent, ...) when uniform."""
        ternary = [v for k, v in self.tensor_bytes.items() if k.startswith("ternary ")]
        if len(ternary) != 1 or not self.ternary_params:
            return None
        return 8 * ternary[0] / self.ternary_params


def parameter_counts(config: ModelConfig) -> tuple[int, int]:
    """(ternary, float) parameter counts of a config's model; tied embeddings count once."""
    with torch.device("meta"):
        model = Transformer(config, lambda cols, out: nn.Linear(cols, out, bias=False))
    ternary = floating = 0
    seen: set[int] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        is_ternary = name.endswith("proj.weight") and not name.startswith("lm_head")
        if is_ternary:
            ternary += p.numel()
        else:
            floating += p.numel()
    if config.use_rms_norm:  # BitLinear's own input RMSNorm (one gain per input feature)
        floating += sum(m.in_features for n, m in model.named_modules() if n.endswith("_proj"))
    return ternary, floating


def ternary_linear_names(config: ModelConfig) -> list[str]:
    """Module names (HF checkpoint form, without the `model.` prefix) of the ternary linears."""
    attn = ("q_proj", "k_proj", "v_proj", "o_proj")
    mlp = ("gate_proj", "up_proj", "down_proj")
    return [
        f"layers.{i}.{part}.{proj}"
        for i in range(config.num_hidden_layers)
        for part, projs in (("self_attn", attn), ("mlp", mlp))
        for proj in projs
    ]

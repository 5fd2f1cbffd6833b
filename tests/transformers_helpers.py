"""Helpers shared by the tests that use transformers as the reference."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file


def legacy_as_transformers(legacy_dir: Path, out: Path) -> Path:
    """A 1bitLLM checkpoint rewritten for transformers' BitNetForCausalLM: the same latent weights with the
    sub-norms renamed, SiLU, and AutoBitLinear quantizing online (what 1bitLLM's BitLinear computes)."""
    out.mkdir()
    cfg = json.loads((legacy_dir / "config.json").read_text())
    assert cfg["architectures"] == ["BitnetForCausalLM"]
    cfg.update(
        model_type="bitnet",
        architectures=["BitNetForCausalLM"],
        quantization_config={
            "quant_method": "bitnet",
            "linear_class": "autobitlinear",
            "quantization_mode": "online",
        },
    )
    (out / "config.json").write_text(json.dumps(cfg))
    renames = {
        ".self_attn.inner_attn_ln.": ".self_attn.attn_sub_norm.",
        ".mlp.ffn_layernorm.": ".mlp.ffn_sub_norm.",
    }
    tensors = {}
    for name, t in load_file(legacy_dir / "model.safetensors").items():
        for old, new in renames.items():
            name = name.replace(old, new)
        tensors[name] = t
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out

"""Named model shapes: `bitnet-2b-4t` is microsoft/bitnet-b1.58-2B-4T; the tiny ones serve tests and demos."""

from __future__ import annotations

from .config import ModelConfig

_BASE_2B4T = dict(
    family="bitnet",
    vocab_size=128256,
    hidden_size=2560,
    intermediate_size=6912,
    num_hidden_layers=30,
    num_attention_heads=20,
    num_key_value_heads=5,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    hidden_act="relu2",
    tie_word_embeddings=True,
    linear_class="autobitlinear",
)

# the Llama-architecture ternary models (SiLU, untied head, no sub-norms)
_LLAMA = dict(
    family="llama",
    rms_norm_eps=1e-5,
    hidden_act="silu",
    tie_word_embeddings=False,
    linear_class="bitlinear",
)
# the size every tiny test/demo model shares
_TINY = dict(
    vocab_size=512,
    hidden_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    bos_token_id=1,
    eos_token_id=2,
)

PRESETS: dict[str, dict] = {
    "bitnet-2b-4t": _BASE_2B4T,
    # 1bitLLM/bitnet_b1_58-3B shape: hidden 3200 is not a multiple of 256
    "bitnet-b1.58-3b": dict(
        _LLAMA,
        vocab_size=32002,
        hidden_size=3200,
        intermediate_size=8640,
        num_hidden_layers=26,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=2048,
        rope_theta=10000.0,
        bos_token_id=1,
        eos_token_id=2,
    ),
    # HF1BitLLM/Llama3-8B-1.58-100B-tokens shape
    "llama3-8b-1.58": dict(
        _LLAMA,
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rope_theta=500000.0,
    ),
    "tiny-bitnet": {**_BASE_2B4T, **_TINY, "intermediate_size": 352},
    "tiny-llama": {**_LLAMA, **_TINY, "intermediate_size": 344, "rms_norm_eps": 1e-6, "rope_theta": 10000.0},
    # 1bitLLM BitnetForCausalLM form: latent float weights, SiLU, sub-norms inner_attn_ln / ffn_layernorm
    "tiny-legacy": {
        **_LLAMA,
        **_TINY,
        "family": "legacy",
        "intermediate_size": 352,
        "num_key_value_heads": 4,
        "rope_theta": 10000.0,
    },
}


def preset(name: str, **overrides) -> ModelConfig:
    """The ModelConfig of a named preset, with field overrides."""
    from ..errors import ConfigError

    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    return ModelConfig(**{**PRESETS[name], **overrides})

"""Model configuration: one dataclass for every supported family, parsed from a HF config.json."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ..errors import ConfigError, UnsupportedModelError

FAMILIES = ("bitnet", "llama", "legacy")
SIZE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "max_position_embeddings",
)
LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
# Larger than any model we could hold: a size past this in a config is corruption, not a model.
MAX_SIZE = 2**24


def _check_size(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_SIZE:
        raise ConfigError(f"{name} must be a positive integer (at most {MAX_SIZE}), got {value!r}")


def _int(cfg: dict[str, Any], key: str, default: Any = None) -> Any:
    """cfg[key] (or `default` when missing or null; KeyError without one) as an int; integral floats (1024.0)
    pass, anything else is left for validation to reject."""
    value = cfg.get(key)
    if value is None:
        if default is None:
            raise KeyError(key)
        value = default
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


@dataclass
class ModelConfig:
    """Architecture of a ternary decoder-only transformer.

    family: "bitnet" (2B-4T: relu², attn/ffn sub-norms), "llama" (llama-style ternary: SiLU, no sub-norms) or
    "legacy" (1bitLLM BitnetForCausalLM: SiLU, sub-norms named inner_attn_ln / ffn_layernorm, latent weights).
    """

    family: str = "bitnet"
    vocab_size: int = 128256
    hidden_size: int = 2560
    intermediate_size: int = 6912
    num_hidden_layers: int = 30
    num_attention_heads: int = 20
    num_key_value_heads: int = 5
    head_dim: int | None = None
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: dict[str, Any] | None = None
    hidden_act: str = "relu2"
    tie_word_embeddings: bool = True
    linear_class: str = "autobitlinear"
    quantization_mode: str = "offline"
    use_rms_norm: bool = False
    linear_norm_eps: float = 1e-6
    bos_token_id: int | None = 128000
    eos_token_id: int | list[int] | None = 128001
    pad_token_id: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise UnsupportedModelError(f"unknown model family {self.family!r}; expected one of {FAMILIES}")
        for name in SIZE_FIELDS:
            _check_size(name, getattr(self, name))
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        _check_size("head_dim", self.head_dim)
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        for name in ("rms_norm_eps", "rope_theta", "linear_norm_eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ConfigError(f"{name} must be a positive number, got {value!r}")
        if self.hidden_act not in ("relu2", "silu"):
            raise UnsupportedModelError(f"hidden_act {self.hidden_act!r} is not supported (relu2 or silu)")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.linear_class not in ("autobitlinear", "bitlinear"):
            raise ConfigError(f"quantization_config.linear_class {self.linear_class!r} is not supported")
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in ("default", "llama3"):
            raise UnsupportedModelError(f"rope_type {rope_type!r} is not supported (default or llama3)")
        missing = [k for k in LLAMA3_ROPE_KEYS if k not in self.rope_scaling] if rope_type == "llama3" else []
        if missing:
            raise ConfigError(f"llama3 rope scaling lacks {', '.join(missing)}")

    @property
    def sub_norms(self) -> bool:
        return self.family in ("bitnet", "legacy")

    @property
    def weight_layout(self) -> str:
        """The HF packed layout whose scale convention this config's linear_class uses."""
        return "hf" if self.linear_class == "autobitlinear" else "hf_inv"

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> ModelConfig:
        """Parse a HF config.json dict (transformers 4.x `rope_theta` or 5.x `rope_parameters`)."""
        if not isinstance(cfg, dict):
            raise ConfigError("config.json must hold a JSON object")
        architectures = cfg.get("architectures") or []
        model_type = cfg.get("model_type")
        quant = cfg.get("quantization_config") or {}
        rope = cfg.get("rope_parameters") or {}
        for key, value, kind in (
            ("architectures", architectures, list),
            ("quantization_config", quant, dict),
            ("rope_parameters", rope, dict),
        ):
            if not isinstance(value, kind):
                raise ConfigError(f"config.json: {key} must be a JSON {kind.__name__}, got {value!r}")
        if "BitnetForCausalLM" in architectures:
            family = "legacy"
        elif model_type == "bitnet" or "BitNetForCausalLM" in architectures:
            family = "bitnet"
        elif model_type == "llama" and quant.get("quant_method") == "bitnet":
            family = "llama"
        else:
            raise UnsupportedModelError(
                f"model_type {model_type!r} (architectures {architectures}) is not a BitNet model pybitnet "
                "can load: expected model_type 'bitnet', a BitnetForCausalLM (1bitLLM) checkpoint, or a "
                "llama model with quantization_config.quant_method 'bitnet'"
            )
        rope_theta = rope.get(
            "rope_theta", cfg.get("rope_theta", 500000.0 if family == "bitnet" else 10000.0)
        )
        rope_scaling = cfg.get("rope_scaling") or (
            rope if rope.get("rope_type", "default") != "default" else None
        )
        try:
            return cls(
                family=family,
                vocab_size=_int(cfg, "vocab_size"),
                hidden_size=_int(cfg, "hidden_size"),
                intermediate_size=_int(cfg, "intermediate_size"),
                num_hidden_layers=_int(cfg, "num_hidden_layers"),
                num_attention_heads=_int(cfg, "num_attention_heads"),
                num_key_value_heads=_int(cfg, "num_key_value_heads", cfg["num_attention_heads"]),
                head_dim=_int(cfg, "head_dim") if cfg.get("head_dim") is not None else None,
                max_position_embeddings=_int(cfg, "max_position_embeddings", 2048),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5 if family == "bitnet" else 1e-6)),
                rope_theta=float(rope_theta),
                rope_scaling=rope_scaling,
                hidden_act=cfg.get("hidden_act", "relu2" if family == "bitnet" else "silu"),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", family == "bitnet")),
                linear_class=quant.get("linear_class") or "bitlinear",
                quantization_mode=quant.get("quantization_mode") or "offline",
                use_rms_norm=bool(quant.get("use_rms_norm", False)),
                linear_norm_eps=float(quant.get("rms_norm_eps", 1e-6)),
                bos_token_id=cfg.get("bos_token_id"),
                eos_token_id=cfg.get("eos_token_id"),
                pad_token_id=cfg.get("pad_token_id"),
            )
        except KeyError as e:
            raise ConfigError(f"config.json lacks the required key {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise ConfigError(f"config.json has a value of the wrong type: {e}") from None

    def _hf_architecture(self) -> dict[str, Any]:
        """The config.json keys every saved form shares: shapes, norms, RoPE, activation, special ids."""
        return {
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "hidden_act": self.hidden_act,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "attention_bias": False,
        }

    def to_hf(self, latent: bool = False) -> dict[str, Any]:
        """A config.json dict that transformers (4.x and 5.x) and pybitnet both load.

        `latent` describes a checkpoint of float master weights: transformers then quantizes online
        (autobitlinear, "online"), and the legacy family gets 1bitLLM's own config form."""
        if latent and self.family == "legacy":
            return self._to_hf_legacy()
        cfg: dict[str, Any] = {
            **self._hf_architecture(),
            "head_dim": self.head_dim,
            "torch_dtype": "bfloat16",
            "quantization_config": {
                "quant_method": "bitnet",
                "linear_class": "autobitlinear" if latent else self.linear_class,
                "quantization_mode": "online" if latent else "offline",
                "use_rms_norm": self.use_rms_norm,
                "rms_norm_eps": self.linear_norm_eps,
            },
        }
        if self.rope_scaling:
            cfg["rope_scaling"] = self.rope_scaling
        if self.family == "llama":
            cfg.update(model_type="llama", architectures=["LlamaForCausalLM"], mlp_bias=False)
        else:  # legacy checkpoints are saved packed, as the 2B-4T architecture they are (sub-norms, any act)
            cfg.update(model_type="bitnet", architectures=["BitNetForCausalLM"])
        return cfg

    def _to_hf_legacy(self) -> dict[str, Any]:
        """1bitLLM's config.json: a llama model_type with the BitnetForCausalLM architecture, no
        quantization_config (its BitLinear always quantizes the float weights on the fly)."""
        cfg = {
            "architectures": ["BitnetForCausalLM"],
            "model_type": "llama",
            **self._hf_architecture(),
            "rope_scaling": self.rope_scaling,
            "input_bits": 8,
            "weight_bits": 1,
            "torch_dtype": "float16",
        }
        if self.head_dim != self.hidden_size // self.num_attention_heads:
            cfg["head_dim"] = self.head_dim
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

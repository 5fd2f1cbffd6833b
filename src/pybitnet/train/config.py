"""Training configuration: plain values (nanoGPT style) read from a YAML recipe and overridden by flags.

Every field is a recipe key and a CLI flag (`warmup_steps` <-> `--warmup-steps`). Unknown keys and bad values
raise ConfigError naming the key, so a typo never silently trains with a default.
"""

from __future__ import annotations

import json
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..models.transformer import CHECKPOINTING

OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULES = ("constant", "cosine", "linear", "exponential", "wsd", "two_stage")
PRECISIONS = ("fp32", "bf16")
GRAD_X_MODES = ("bf16", "int8")  # how the int8 BitLinear computes grad_x (pybitnet.train.fused)
DISTRIBUTED = ("auto", "none", "ddp", "fsdp")
LOGGERS = ("console", "csv", "jsonl", "tensorboard")
DATA_FORMATS = ("auto", "text", "jsonl", "json", "csv", "parquet")


@dataclass
class TrainConfig:
    # model: a preset trained from scratch, or a checkpoint directory (pybitnet/BitNet or a transformers LM)
    preset: str | None = None
    model_overrides: dict[str, Any] = field(default_factory=dict)
    init_from: str | None = None
    tokenizer: str | None = None
    quantize: bool = True  # False trains the full-precision twin (nn.Linear) for comparisons
    convert_exclude: list[str] = field(default_factory=lambda: ["lm_head", "embed_tokens"])
    add_sub_norms: bool = False
    quant_warmup_steps: int = 0  # λ for weights goes 0 -> 1 linearly over this many steps
    act_quant_warmup_steps: int | None = None  # same for activations; None = quant_warmup_steps
    freeze: list[str] = field(default_factory=list)  # fnmatch patterns of parameter names not to train
    # data
    train_data: list[str] = field(default_factory=list)
    val_data: list[str] = field(default_factory=list)
    data_format: str = "auto"
    text_field: str = "text"
    seq_len: int = 256
    packing: bool = True
    streaming: bool = False
    shuffle: bool = True
    on_bad_record: str = "fail"  # or "skip"
    # optimization
    max_steps: int = 1000
    micro_batch_size: int = 8
    grad_accum_steps: int = 1
    optimizer: str = "adamw"
    lr: float = 1e-3
    min_lr: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    momentum: float = 0.9
    weight_decay: float = 0.1
    schedule: str = "cosine"
    warmup_steps: int = 0
    decay_fraction: float = 0.2  # wsd: the final fraction of steps that decays
    exp_gamma: float = 0.999  # exponential: lr multiplier per step after warm-up
    stage_split: float = 0.5  # two_stage: fraction of steps in stage 1
    stage2_lr_ratio: float = 0.4  # two_stage: stage-2 starting lr relative to lr
    grad_clip: float = 1.0  # 0 disables clipping
    precision: str = "bf16"  # bf16 = float32 masters with bf16 autocast
    compile: bool = False
    activation_checkpointing: str = "none"  # "mlp" / "block": recompute those activations in the backward
    fused_kernels: bool = True  # Triton BitLinear kernels on CUDA when available
    fused_grad_x: str = "bf16"  # "int8": grad_x on the int8 GEMM too (faster, g rounded to 8 bits per row)
    seed: int = 1337
    deterministic: bool = False
    device: str = "auto"
    distributed: str = "auto"
    # evaluation, logging, checkpoints
    eval_interval: int = 0  # 0: evaluate only at the end
    eval_batches: int = 0  # 0: the whole validation set
    log_interval: int = 10
    loggers: list[str] = field(default_factory=lambda: ["console", "jsonl"])
    out_dir: str = "out"
    save_interval: int = 0  # 0: save only at the end
    keep_last: int = 3
    resume: bool = True  # continue from the newest checkpoint in out_dir/checkpoints when there is one
    export: bool = True  # write the HF packed checkpoint and the bf16 master at the end

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        _one_of("optimizer", self.optimizer, OPTIMIZERS)
        _one_of("schedule", self.schedule, SCHEDULES)
        _one_of("precision", self.precision, PRECISIONS)
        _one_of("fused_grad_x", self.fused_grad_x, GRAD_X_MODES)
        _one_of("activation_checkpointing", self.activation_checkpointing, CHECKPOINTING)
        _one_of("distributed", self.distributed, DISTRIBUTED)
        _one_of("data_format", self.data_format, DATA_FORMATS)
        _one_of("on_bad_record", self.on_bad_record, ("fail", "skip"))
        for name in self.loggers:
            _one_of("loggers", name, LOGGERS)
        for key in (
            "max_steps",
            "micro_batch_size",
            "grad_accum_steps",
            "seq_len",
            "log_interval",
            "keep_last",
        ):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be at least 1, got {getattr(self, key)}")
        for key in ("warmup_steps", "quant_warmup_steps", "eval_interval", "eval_batches", "save_interval"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key} must not be negative, got {getattr(self, key)}")
        if self.act_quant_warmup_steps is not None and self.act_quant_warmup_steps < 0:
            raise ConfigError(
                f"act_quant_warmup_steps must not be negative, got {self.act_quant_warmup_steps}"
            )
        for key in ("lr", "min_lr", "weight_decay", "grad_clip", "eps"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key} must not be negative, got {getattr(self, key)}")
        if self.min_lr > self.lr:
            raise ConfigError(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr})")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"betas must be two numbers in [0, 1), got {self.betas}")
        for key in ("decay_fraction", "stage_split", "stage2_lr_ratio", "exp_gamma"):
            if not 0 < getattr(self, key) <= 1:
                raise ConfigError(f"{key} must be in (0, 1], got {getattr(self, key)}")
        if (self.preset is None) == (self.init_from is None):
            raise ConfigError(
                "set exactly one of preset (train from scratch) and init_from (a checkpoint dir)"
            )
        if not self.train_data:
            raise ConfigError("train_data is empty: list at least one data file")
        if self.streaming and self.shuffle:
            self.shuffle = False  # a stream is read in order; shuffle the files beforehand

    @property
    def act_warmup(self) -> int:
        return self.quant_warmup_steps if self.act_quant_warmup_steps is None else self.act_quant_warmup_steps

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _one_of(key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key} must be one of {', '.join(allowed)}; got {value!r}")


def field_types() -> dict[str, Any]:
    """Field name -> its resolved type annotation."""
    hints = typing.get_type_hints(TrainConfig)
    return {f.name: hints[f.name] for f in fields(TrainConfig)}


def field_default(name: str) -> Any:
    f = next(f for f in fields(TrainConfig) if f.name == name)
    return f.default_factory() if f.default is MISSING else f.default


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check a recipe value against the field's type (ints pass as floats; YAML lists stay lists)."""
    args = typing.get_args(annotation)
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner[0])
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif annotation is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif origin is list:
        items = value if isinstance(value, list) else [value]
        return [_coerce(key, v, args[0]) for v in items]
    elif origin is dict and isinstance(value, dict):
        return value
    raise ConfigError(f"{key}: expected {getattr(annotation, '__name__', annotation)}, got {value!r}")


def config_from_dict(values: dict[str, Any], source: str = "recipe") -> TrainConfig:
    """A validated TrainConfig; an unknown key is an error that names it."""
    types_ = field_types()
    unknown = [k for k in values if k not in types_]
    if unknown:
        raise ConfigError(
            f"unknown key{'s' if len(unknown) > 1 else ''} in {source}: {', '.join(unknown)}; "
            f"see `pybitnet train --help` for the valid keys"
        )
    return TrainConfig(**{k: _coerce(k, v, types_[k]) for k, v in values.items()})


def read_recipe(path: str | Path) -> dict[str, Any]:
    """The key/value mapping of a YAML (or JSON) recipe file."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe {path} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path} must be a mapping of keys to values, not {type(data).__name__}")
    return data


def parse_flag_value(key: str, text: str) -> Any:
    """A flag's text as a value of the field's type: JSON/YAML scalars, lists ("a,b" or "[a, b]"), dicts."""
    import yaml

    annotation = field_types()[key]
    origin = typing.get_origin(annotation)
    if origin is list and not text.lstrip().startswith("["):
        return [parse_flag_value_scalar(t) for t in text.split(",") if t != ""]
    if origin is dict:
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(
                f"--{key.replace('_', '-')}: expected a JSON object, got {text!r} ({e})"
            ) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_flag_value_scalar(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text

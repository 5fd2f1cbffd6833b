"""HF checkpoints (config.json + safetensors) <-> Transformer.

Ternary linears are read in whichever form the file holds them: packed uint8 (quant_method "bitnet", either
weight_scale convention), unpacked ternary floats with a weight_scale (what transformers itself saves), or
latent float weights (ternarized here with the absmean rule).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..errors import ConfigError, ModelNotFoundError, WeightsError
from ..kernels import Kernel
from ..models import ModelConfig, Transformer
from ..models.summary import ModelSummary, parameter_counts, ternary_linear_names
from ..models.transformer import rope_inv_freq
from ..nn import BitLinear, PackedBitLinear, RMSNorm
from ..quant import PackedWeight, TernaryWeight, pack, quantize_weight, repack
from .config_json import read_json
from .memory import LOOKED_UP, FileRows, advise_random_reads, release_freed_heap
from .safetensors_io import INDEX_NAME, SINGLE_NAME, TORCH_DTYPES, TensorReader

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
)

# legacy 1bitLLM names -> ours
LEGACY_RENAMES = {
    ".self_attn.inner_attn_ln.": ".self_attn.attn_sub_norm.",
    ".mlp.ffn_layernorm.": ".mlp.ffn_sub_norm.",
}


def _checkpoint_name(name: str, config: ModelConfig) -> str:
    if config.family == "legacy":
        for ours_src, theirs in ((v, k) for k, v in LEGACY_RENAMES.items()):
            name = name.replace(ours_src, theirs)
    return name if name.startswith("lm_head.") else f"model.{name}"


def read_ternary(
    reader: TensorReader, name: str, shape: tuple[int, int], config: ModelConfig, keep_mapped: bool = True
) -> PackedWeight:
    """The ternary weight `name` ([out, in]) of the checkpoint as a PackedWeight.

    Packed weights stay views of the memory-mapped file when `keep_mapped` (the kernel uses the HF bits as
    they are). Otherwise, and for float weights (ternarized here), the file is read into private copies, so
    after the conversion none of its pages stays resident in this process.
    """
    out, cols = shape
    weight_name, scale_name = f"{name}.weight", f"{name}.weight_scale"
    dtype, stored = reader.header(weight_name)
    if dtype == "U8":
        if stored != (-(-out // 4), cols):
            raise WeightsError(
                f"{weight_name}: packed shape {stored} does not match [{-(-out // 4)}, {cols}] "
                f"for a {out}x{cols} layer"
            )
        w = reader.get(weight_name) if keep_mapped else reader.read(weight_name)
        return PackedWeight(config.weight_layout, w, _weight_scale(reader, scale_name), shape)
    if stored != shape:
        raise WeightsError(f"{weight_name}: shape {stored} does not match the config's {list(shape)}")
    if not _is_float(dtype):
        raise WeightsError(f"{weight_name}: dtype {dtype} is neither packed uint8 nor floating point")
    w = reader.read(weight_name)
    if scale_name in reader:  # unpacked ternary values with their scale, as transformers saves them
        codes = w.round()
        if not torch.equal(codes, w) or codes.abs().max() > 1:
            raise WeightsError(f"{weight_name} has a weight_scale but its values are not all in {{-1, 0, 1}}")
        tw = TernaryWeight(codes.to(torch.int8), _weight_scale(reader, scale_name).reshape(()))
        if config.weight_layout == "hf_inv":
            tw = TernaryWeight(tw.codes, 1.0 / tw.scale)
        return _as_hf(tw)
    return _as_hf(quantize_weight(w))


def _is_float(dtype: str) -> bool:
    return dtype in TORCH_DTYPES and TORCH_DTYPES[dtype].is_floating_point


def _as_hf(tw: TernaryWeight) -> PackedWeight:
    return pack(tw, "hf")


def _weight_scale(reader: TensorReader, name: str) -> torch.Tensor:
    """The float32 [1] scale `name` (read, not mapped: a tiny tensor in the middle of large ones)."""
    dtype, shape = reader.header(name)
    if math.prod(shape) != 1 or not _is_float(dtype):
        raise WeightsError(f"{name}: expected one floating-point value, got {dtype} {list(shape)}")
    scale = reader.read(name).float().reshape(1)
    if not torch.isfinite(scale).all() or scale.item() == 0:
        raise WeightsError(f"{name}: scale {scale.item()} is not a finite non-zero number")
    return scale


def _read_float(reader: TensorReader, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A float tensor: a view of the mapped file when stored in `dtype`, else a converted private copy."""
    stored_dtype, stored = reader.header(name)
    if stored != shape:
        raise WeightsError(f"{name}: shape {stored} does not match the config's {list(shape)}")
    if not _is_float(stored_dtype):
        raise WeightsError(f"{name}: dtype {stored_dtype} is not floating point")
    if TORCH_DTYPES[stored_dtype] == dtype:
        return reader.get(name)
    return reader.read(name).to(dtype)


def _stored_dtype(reader: TensorReader, name: str) -> torch.dtype | None:
    return TORCH_DTYPES.get(reader.header(name)[0])


def _embedding_dtype(reader: TensorReader, name: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype the embeddings are kept in for a model whose head is a separate int8 copy (the C kernels'
    models): as stored when widening them to `dtype` is exact (a bf16 or fp16 table in a float32 model), so
    they stay a view of the mapped file, each lookup widens the rows it reads (the same values) and no
    float32 copy of the table is made (1.25 GB for a 2B model)."""
    stored = _stored_dtype(reader, name)
    return stored if dtype == torch.float32 and stored in (torch.bfloat16, torch.float16) else dtype


HF_LAYOUTS = ("hf", "hf_inv")


def read_config(model_dir: Path) -> tuple[ModelConfig, dict]:
    """The ModelConfig of an HF model directory, and its config.json as read."""
    if not model_dir.is_dir():
        raise ModelNotFoundError(
            f"{model_dir} is not a model directory: pybitnet loads a Hugging Face model directory "
            "(config.json + *.safetensors), a .gguf file, or a hub id"
        )
    path = model_dir / "config.json"
    if not path.is_file():
        raise ConfigError(
            f"no config.json in {model_dir}: is this a Hugging Face model directory? Download the complete "
            "model (`pybitnet pull ORG/NAME`) or write one with `pybitnet create-dummy`"
        )
    raw = read_json(path)
    return ModelConfig.from_hf(raw), raw


def load_hf_model(model_dir: Path, kernel: Kernel, dtype: torch.dtype = torch.float32) -> Transformer:
    """Build the Transformer for `model_dir` with every ternary linear packed once for `kernel`."""
    model_dir = Path(model_dir)
    config, _ = read_config(model_dir)
    reader = TensorReader(model_dir)
    with torch.device("meta"):
        model = Transformer(config, lambda i, o: nn.Linear(i, o, bias=False))
    in_place = kernel.layout in HF_LAYOUTS  # the kernel runs on the file's packed bits: keep them mapped
    linears = {name for name, m in model.named_modules() if isinstance(m, nn.Linear) and name != "lm_head"}
    # float tensors first (views of the mapped file), then the int8 head if the kernel's model uses one, then
    # the ternary linears: the head's temporaries are gone before the repacked weights accumulate
    native_cpu = kernel.layout == "cpu_i2"
    for name, param in list(model.named_parameters()):
        module_name, _, attr = name.rpartition(".")
        if module_name in linears or (name == "lm_head.weight" and config.tie_word_embeddings):
            continue
        ckpt_name = _checkpoint_name(name, config)
        looked_up = native_cpu and name in LOOKED_UP
        want = _embedding_dtype(reader, ckpt_name, dtype) if looked_up else dtype
        tensor = _read_float(reader, ckpt_name, tuple(param.shape), want)
        if name == "embed_tokens.weight" and looked_up and tensor.dtype == _stored_dtype(reader, ckpt_name):
            advise_random_reads(tensor)  # mapped: pages on demand
        setattr(model.get_submodule(module_name), attr, nn.Parameter(tensor, requires_grad=False))
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    if kernel.layout == "cpu_i2":
        head = _checkpoint_name(
            "embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight", config
        )
        model.build_int8_head(FileRows(reader, head, reader.header(head)[1], dtype))
        release_freed_heap()
    for name, module in list(model.named_modules()):
        if not in_place and name.endswith(".mlp"):  # a layer's weights were converted
            release_freed_heap()
        if name in linears:
            shape = (module.out_features, module.in_features)
            packed = read_ternary(reader, _checkpoint_name(name, config), shape, config, keep_mapped=in_place)
            norm = None
            if config.use_rms_norm:
                norm = RMSNorm(module.in_features, config.linear_norm_eps)
                norm.weight = nn.Parameter(
                    _read_float(
                        reader, _checkpoint_name(f"{name}.rms_norm.weight", config), (shape[1],), dtype
                    ),
                    requires_grad=False,
                )
            model.set_submodule(name, PackedBitLinear.from_packed(packed, kernel, input_norm=norm))
    model.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)
    if not in_place:
        release_freed_heap()
    return model.eval()


def save_hf_model(
    model: Transformer,
    out_dir: Path,
    tokenizer_dir: Path | None = None,
    max_shard_bytes: int | None = None,
) -> None:
    """Write an HF checkpoint (config.json + safetensors + tokenizer files) that both pybitnet and
    transformers load.

    Packed (inference-form) linears are stored in the HF packed layout, in the config's weight_scale
    convention.
    Training-form `BitLinear`s are stored as their latent float weights with a config that quantizes online;
    a legacy-family model in training form is written as a 1bitLLM checkpoint (its names and config).
    `max_shard_bytes` splits the weights into shards with a model.safetensors.index.json (as transformers
    does).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    config = model.config
    latent = _is_latent(model)
    name_of = (lambda n: _checkpoint_name(n, config)) if latent and config.family == "legacy" else _saved_name
    tensors: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, PackedBitLinear):
            tensors.update(_packed_tensors(name_of(name), module.weight(), config))
        if isinstance(module, (PackedBitLinear, BitLinear)) and module.input_norm is not None:
            tensors[name_of(f"{name}.rms_norm.weight")] = module.input_norm.weight
    for name, param in model.named_parameters():
        if ".input_norm." in name or (name == "lm_head.weight" and config.tie_word_embeddings):
            continue
        tensors[name_of(name)] = param
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    write_safetensors(tensors, out_dir, max_shard_bytes)
    if latent:
        hf_config = config.to_hf(latent=True)
    else:  # packed legacy models are saved as the 2B-4T architecture they are (sub-norms, any activation)
        family = "bitnet" if config.family == "legacy" else config.family
        hf_config = ModelConfig(**{**config.to_dict(), "family": family}).to_hf()
    hf_config["torch_dtype"] = str(model.dtype).removeprefix("torch.")
    (out_dir / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    if tokenizer_dir is not None:
        for fname in TOKENIZER_FILES:
            if (tokenizer_dir / fname).is_file() and tokenizer_dir.resolve() != out_dir.resolve():
                shutil.copyfile(tokenizer_dir / fname, out_dir / fname)


def _is_latent(model: Transformer) -> bool:
    kinds = {type(m) for m in model.modules() if isinstance(m, (PackedBitLinear, BitLinear))}
    if kinds == {PackedBitLinear, BitLinear}:
        raise WeightsError(
            "the model mixes packed and training-form linears; convert them all with BitLinear.to_packed() "
            "(or PackedBitLinear.to_latent()) before saving"
        )
    return kinds == {BitLinear}


def write_safetensors(
    tensors: dict[str, torch.Tensor], out_dir: Path, max_shard_bytes: int | None = None
) -> None:
    """model.safetensors, or shards model-0000i-of-0000n.safetensors plus model.safetensors.index.json."""
    meta = {"format": "pt"}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if max_shard_bytes is not None and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(out_dir / SINGLE_NAME), metadata=meta)
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out_dir / fname), metadata=meta)
        weight_map.update(dict.fromkeys(shard, fname))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def _saved_name(name: str) -> str:
    """Saved checkpoints use the 2B-4T names even for legacy models (they are saved as that architecture)."""
    return name if name.startswith("lm_head.") else f"model.{name}"


def _packed_tensors(prefix: str, pw: PackedWeight, config: ModelConfig) -> dict[str, torch.Tensor]:
    pw = repack(pw, config.weight_layout)  # no unpacking when the kernel keeps the HF bits
    if pw.scale.numel() != 1:
        raise WeightsError(f"{prefix}: HF checkpoints hold one scale per tensor; split fused layers first")
    return {f"{prefix}.weight": pw.data, f"{prefix}.weight_scale": pw.scale.float().reshape(1)}


# bytes per element of safetensors' dtype names
_DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
}
_DTYPE_BYTES |= {"I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def summarize_hf(model_dir: Path) -> ModelSummary:
    """Architecture, parameter counts, ternary layout and bytes of an HF checkpoint, from its config and the
    safetensors headers (no tensor data is read)."""
    model_dir = Path(model_dir)
    config, raw = read_config(model_dir)
    reader = TensorReader(model_dir)
    ternary, floating = parameter_counts(config)
    linears = {_checkpoint_name(name, config) for name in ternary_linear_names(config)}
    kinds: set[str] = set()
    tensor_bytes: dict[str, int] = {}
    for name in reader.names():
        dtype, shape = reader.header(name)
        module = name.removesuffix(".weight_scale").removesuffix(".weight")
        role = "float"
        if module in linears:
            role = "scales" if name.endswith(".weight_scale") else "ternary"
        if role == "ternary":
            kinds.add(_ternary_form(dtype, f"{module}.weight_scale" in reader, config))
        key = f"{role} {dtype}"
        tensor_bytes[key] = tensor_bytes.get(key, 0) + _DTYPE_BYTES.get(dtype, 0) * _numel(shape)
    files = {p.name: p.stat().st_size for p in sorted(model_dir.iterdir()) if p.is_file()}
    return ModelSummary(
        path=model_dir,
        file_format="safetensors",
        architecture=", ".join(raw.get("architectures") or [str(raw.get("model_type"))]),
        config=config,
        ternary_params=ternary,
        float_params=floating,
        layout="; ".join(sorted(kinds)) or "no ternary weights found",
        files=files,
        weight_bytes=sum(p.stat().st_size for p in set(reader.files.values())),
        tensor_bytes=tensor_bytes,
    )


def _ternary_form(dtype: str, has_scale: bool, config: ModelConfig) -> str:
    if dtype == "U8":
        direction = "multiplies" if config.weight_layout == "hf" else "divides"
        return f"HF packed 2-bit (uint8, 4 per byte), weight_scale {direction} ({config.linear_class})"
    if has_scale:
        return f"unpacked ternary {dtype} values with weight_scale"
    return f"latent {dtype} weights, ternarized at load (absmean)"


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n

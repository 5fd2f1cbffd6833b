"""The top-level Python API."""

from __future__ import annotations

from pathlib import Path

import torch

from .formats.hf import load_hf_model, summarize_hf
from .hub import resolve_model
from .kernels import select_kernel
from .models import Transformer
from .models.summary import ModelSummary, parameter_counts


def load_model(
    model: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    kernel: str | None = None,
) -> Transformer:
    """Load a BitNet model (hub id, local directory or .gguf file) as a torch module:
    model(input_ids) -> logits."""
    device = torch.device(device)
    path = resolve_model(model)
    if path.is_file() and path.suffix.lower() == ".gguf":
        from .formats.gguf_import import load_gguf_model  # the gguf package is needed for GGUF files only

        return load_gguf_model(path, select_kernel(device, kernel), dtype).to(device)
    return load_hf_model(path, select_kernel(device, kernel), dtype).to(device)


def summarize_model(model: str | Path) -> ModelSummary:
    """Architecture, parameter counts, weight layout and bytes of a model (hub id, directory or .gguf file),
    read from its config and tensor headers without loading the weights."""
    path = resolve_model(model)
    if path.is_file() and path.suffix == ".gguf":
        return _summarize_gguf(path)
    return summarize_hf(path)


def _summarize_gguf(path: Path) -> ModelSummary:
    from .formats.gguf_file import GGUFFile
    from .formats.gguf_import import config_from_gguf

    f = GGUFFile(path)
    config = config_from_gguf(f)
    ternary, floating = parameter_counts(config)
    ternary_types = {"TQ1_0", "TQ2_0", "I2_S"}
    tensor_bytes: dict[str, int] = {}
    for info in f.tensors.values():
        key = f"{'ternary' if info.type_name in ternary_types else 'float'} {info.type_name}"
        tensor_bytes[key] = tensor_bytes.get(key, 0) + info.nbytes
    layouts = sorted(k.removeprefix("ternary ") for k in tensor_bytes if k.startswith("ternary "))
    return ModelSummary(
        path=path,
        file_format="gguf",
        architecture=f.architecture,
        config=config,
        ternary_params=ternary,
        float_params=floating,
        layout=", ".join(f"GGUF {name}" for name in layouts) or "no ternary tensors",
        files={path.name: path.stat().st_size},
        weight_bytes=path.stat().st_size,
        tensor_bytes=tensor_bytes,
    )

"""The top-level Python API."""

from __future__ import annotations

from pathlib import Path

import torch

from .formats.gguf_import import load_gguf_model
from .formats.hf import load_hf_model
from .hub import resolve_model
from .kernels import select_kernel
from .models import Transformer


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
    load = load_gguf_model if path.is_file() and path.suffix == ".gguf" else load_hf_model
    return load(path, select_kernel(device, kernel), dtype).to(device)

"""Choosing the model runner: the CUDA-graph runner on a GPU, the eager ModelRunner elsewhere.

Kept apart from cuda_graph.py so that importing the engine never imports Triton.
"""

from __future__ import annotations

import os

from ..models import Transformer
from ..models.transformer import HEAD_ENV
from .runner import ModelRunner


def cuda_graph_supported(model: Transformer) -> bool:
    """A CUDA model whose ternary linears have no bias or input norm, with Triton installed."""
    from ..kernels.triton import triton_installed

    if model.device.type != "cuda" or not triton_installed():
        return False
    linears = [m for m in model.layers.modules() if hasattr(m, "ternary")]
    return all(getattr(m, "bias", None) is None and getattr(m, "input_norm", None) is None for m in linears)


def make_runner(model: Transformer, max_model_len: int):
    """CudaGraphRunner for a supported CUDA model, else ModelRunner. The output head follows the model's
    head mode ($PYBITNET_LM_HEAD): "float" keeps the float head; "int8", "auto" and "int4" (a CPU-only
    layout) use the int8 one."""
    if not cuda_graph_supported(model):
        return ModelRunner(model, max_model_len)
    from .cuda_graph import CudaGraphRunner

    mode = model.head_mode or os.environ.get(HEAD_ENV, "auto")
    return CudaGraphRunner(model, max_model_len, lm_head="float" if mode == "float" else "int8")

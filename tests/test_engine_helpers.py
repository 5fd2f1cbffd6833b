"""Shared test helpers for the engine, API and CLI tests: tiny dummy checkpoints (created once per run) and LLMs."""

from __future__ import annotations

import atexit
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

from pybitnet.engine import LLM, Tokenizer
from pybitnet.models.dummy import create_dummy
from pybitnet.models.presets import preset

_ROOT = Path(tempfile.mkdtemp(prefix="pybitnet-engine-tests-"))
atexit.register(shutil.rmtree, _ROOT, True)

# name -> (preset, overrides): the two ternary families; "tiny-bitnet-untied" gives varied greedy text (a tied
# random model mostly echoes its input token, since its logits are the embeddings dotted with the state).
MODELS = {
    "tiny-llama": ("tiny-llama", {}),
    "tiny-bitnet": ("tiny-bitnet", {}),
    "tiny-bitnet-untied": ("tiny-bitnet", {"tie_word_embeddings": False}),
}


@lru_cache(maxsize=None)
def model_dir(name: str = "tiny-llama", seed: int = 0) -> Path:
    """A dummy checkpoint (fp32, HF packed, with tokenizer and the 2B-4T chat template), created once."""
    preset_name, overrides = MODELS[name]
    return create_dummy(preset(preset_name, **overrides), _ROOT / f"{name}-{seed}", seed=seed, dtype=torch.float32)


@lru_cache(maxsize=None)
def tiny_llm(name: str = "tiny-llama", max_num_seqs: int = 8) -> LLM:
    """An LLM on a dummy checkpoint with the reference kernel (shared: tests must not leave requests running)."""
    return LLM(model_dir(name), device="cpu", kernel="reference", max_num_seqs=max_num_seqs, seed=0)


def tokenizer(name: str = "tiny-llama") -> Tokenizer:
    return tiny_llm(name).tokenizer

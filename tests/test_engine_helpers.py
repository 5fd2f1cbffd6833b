"""Helpers shared by the engine, API and CLI tests: tiny dummy checkpoints (made once per run) and LLMs."""

from __future__ import annotations

import atexit
import shutil
import tempfile
from functools import cache
from pathlib import Path

import torch

from pybitnet.engine import LLM, Tokenizer
from pybitnet.models.dummy import create_dummy
from pybitnet.models.presets import preset

_ROOT = Path(tempfile.mkdtemp(prefix="pybitnet-engine-tests-"))
atexit.register(shutil.rmtree, _ROOT, True)

# name -> (preset, overrides, seed): the two ternary families and 1bitLLM's latent one; "tiny-bitnet-untied"
# gives varied greedy text (a tied random model mostly echoes its input token, since its logits are the
# embeddings dotted with the state); legacy seed 3 is one whose greedy text does not fall into a short loop.
MODELS = {
    "tiny-llama": ("tiny-llama", {}, 0),
    "tiny-bitnet": ("tiny-bitnet", {}, 0),
    "tiny-bitnet-untied": ("tiny-bitnet", {"tie_word_embeddings": False}, 0),
    "tiny-legacy": ("tiny-legacy", {}, 3),
}


@cache
def model_dir(name: str = "tiny-llama", seed: int | None = None) -> Path:
    """A dummy checkpoint (fp32, HF packed or, for legacy, 1bitLLM's latent weights; with tokenizer and the
    2B-4T chat template), created once; seed=None takes the seed MODELS gives the name."""
    preset_name, overrides, default_seed = MODELS[name]
    seed = default_seed if seed is None else seed
    return create_dummy(
        preset(preset_name, **overrides), _ROOT / f"{name}-{seed}", seed=seed, dtype=torch.float32
    )


@cache
def tiny_llm(name: str = "tiny-llama", max_num_seqs: int = 8) -> LLM:
    """An LLM on a dummy checkpoint, reference kernel (shared: tests must not leave requests running)."""
    return LLM(model_dir(name), device="cpu", kernel="reference", max_num_seqs=max_num_seqs, seed=0)


def tokenizer(name: str = "tiny-llama") -> Tokenizer:
    return tiny_llm(name).tokenizer


def cli_app():
    """The `pybitnet` typer app with every verb registered (once)."""
    from pybitnet.cli import app as app_module

    if not any(c.name == "run" for c in app_module.app.registered_commands):
        app_module._register_verbs()
    return app_module.app


def cli_model_args(name: str = "tiny-llama") -> list[str]:
    """MODEL plus the options that make CLI runs comparable with tiny_llm(name) (CPU, reference kernel)."""
    return [str(model_dir(name)), "--device", "cpu", "--kernel", "reference"]


@cache
def gguf_model() -> tuple[Path, Path]:
    """(HF checkpoint dir, the same model converted to GGUF TQ2_0): a llama-style dummy whose layers' inputs
    are multiples of 256, as the TQ layouts need."""
    from pybitnet.formats.gguf_export import convert_hf_to_gguf

    config = preset(
        "tiny-llama", hidden_size=256, intermediate_size=512, num_hidden_layers=1, num_attention_heads=4
    )
    hf_dir = create_dummy(config, _ROOT / "gguf-src", seed=0, dtype=torch.bfloat16)
    return hf_dir, convert_hf_to_gguf(hf_dir, _ROOT / "tiny.gguf")

"""Shared fixtures: tiny dummy checkpoints in the exact hub layouts, and transformers as the reference."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels run in Triton's CPU interpreter; it must be on before anything imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from pybitnet.models.dummy import create_dummy
from pybitnet.models.presets import preset


@pytest.fixture(scope="session")
def dummy_dir(tmp_path_factory) -> Callable[..., Path]:
    """dummy_dir(preset_name, dtype=torch.float32, seed=0, **config_overrides) -> a checkpoint directory,
    written once per session and shared: tests must not modify it (copy it first)."""
    made: dict[tuple, Path] = {}

    def make(name: str, dtype: torch.dtype = torch.float32, seed: int = 0, **overrides) -> Path:
        key = (name, dtype, seed, tuple(sorted(overrides.items())))
        if key not in made:
            out = tmp_path_factory.mktemp(name)
            made[key] = create_dummy(preset(name, **overrides), out, seed=seed, dtype=dtype)
        return made[key]

    return make


@pytest.fixture
def no_dynamo():
    """transformers' BitNet integration wraps its quantization helpers in torch.compile; compiling them on CPU
    takes longer than every test here together, and eager mode computes the same numbers."""
    import torch._dynamo

    with torch._dynamo.config.patch(disable=True):
        yield


@pytest.fixture
def hf_reference(no_dynamo) -> Callable[[Path], torch.nn.Module]:
    """hf_reference(path) -> transformers' AutoModelForCausalLM for `path`, entirely in float32."""
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()

    def load(path: Path) -> torch.nn.Module:
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        # with a quantizer, transformers 5 keeps the checkpoint dtype of unquantized tensors; cast them here
        for module in model.modules():
            for p in module.parameters(recurse=False):
                if p.is_floating_point():
                    p.data = p.data.float()
            for name, b in module.named_buffers(recurse=False):
                if b is not None and b.is_floating_point():
                    setattr(module, name, b.float())
        return model.eval()

    return load


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| / max |ref|: the figure the done-criteria bound by 1e-4."""
    return ((ours.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


@pytest.fixture(scope="session")
def cli_app():
    """The `pybitnet` typer app with every verb registered (once per process)."""
    from pybitnet.cli import app as app_module

    if not any(c.name == "info" for c in app_module.app.registered_commands):
        app_module._register_verbs()
    return app_module.app


def mapped_ranges(path: Path) -> list[tuple[int, int]]:
    """The address ranges at which this process maps the file `path` (/proc/self/maps; Linux)."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        if line.endswith(str(path.resolve())):
            lo, hi = line.split()[0].split("-")
            ranges.append((int(lo, 16), int(hi, 16)))
    return ranges

"""The model used when none is named: the one place a model shipped with the package plugs in.

The package ships a small ternary code-completion model (src/pybitnet/default_model, trained by pybitnet's own
trainer with recipes/demo.yaml on the Python sources of the standard library, torch, sympy, networkx and
numpy), so every verb works offline.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import ModelNotFoundError

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "default_model"
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


def default_model() -> str | Path | None:
    """The shipped model's directory, or None when the install lacks it (a build that left out the data)."""
    if (DEFAULT_MODEL_DIR / "config.json").is_file() and (DEFAULT_MODEL_DIR / "model.safetensors").is_file():
        return DEFAULT_MODEL_DIR
    return None


def model_or_default(model: str | Path | None) -> str | Path:
    """`model`, or the default model when it is None (an error naming what to pass if there is none)."""
    if model is not None and str(model) != "":
        return model
    default = default_model()
    if default is None:
        raise ModelNotFoundError(
            "no model given and the default model is missing from this install: pass a hub id (org/name) or "
            "a local model directory, e.g. `pybitnet run microsoft/bitnet-b1.58-2B-4T`"
        )
    return default


def names_a_model(text: str) -> bool:
    """Whether a lone positional argument is a model (an existing path, a .gguf file, a path-like string or
    an org/name hub id) rather than a prompt for the default model."""
    if Path(text).expanduser().exists() or text.endswith(".gguf") or text.startswith(("/", ".", "~")):
        return True
    return _HUB_ID.fullmatch(text) is not None


def split_model_and_prompt(model: str | None, prompt: str | None) -> tuple[str | None, str | None]:
    """(model, prompt) of `pybitnet run [MODEL] [PROMPT]`: one argument that names no model is the prompt,
    as in `pybitnet run "def fibonacci(n):"`, when a default model is installed."""
    if prompt is None and model is not None and not names_a_model(model) and default_model() is not None:
        return None, model
    return model, prompt

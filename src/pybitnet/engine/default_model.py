"""The model used when none is named: the one place a model shipped with the package plugs in."""

from __future__ import annotations

from pathlib import Path

from ..errors import ModelNotFoundError


def default_model() -> str | Path | None:
    """The default model's hub id or directory, or None while the package ships no model."""
    return None


def model_or_default(model: str | Path | None) -> str | Path:
    """`model`, or the default model when it is None (an error naming what to pass if there is none)."""
    if model is not None and str(model) != "":
        return model
    default = default_model()
    if default is None:
        raise ModelNotFoundError(
            "no model given: pass a hub id (org/name) or a local model directory, "
            "e.g. `pybitnet run microsoft/bitnet-b1.58-2B-4T` (pybitnet ships no default model yet)"
        )
    return default

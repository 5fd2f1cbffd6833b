"""`pybitnet pull ID`: download a model from the Hugging Face hub into the HF cache."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from ..errors import ModelNotFoundError
from ..hub import resolve_model
from .common import err, user_errors


def register(app: typer.Typer) -> None:
    app.command("pull")(pull)


def pull(
    model_id: Annotated[str, typer.Argument(metavar="ID", help="Hub id of the model (org/name).")],
    revision: Annotated[
        str | None, typer.Option("--revision", help="Branch, tag or commit (default: main).")
    ] = None,
) -> None:
    """Download a model's config, weights and tokenizer into the Hugging Face cache (HF_HOME)."""
    with user_errors():
        if Path(model_id).expanduser().exists():
            raise ModelNotFoundError(f"{model_id!r} is a local path; pull takes a hub id such as org/name")
        path = resolve_model(model_id, revision=revision, download=True)
    err.print(f"pulled {escape(model_id)} -> {escape(str(path))}")

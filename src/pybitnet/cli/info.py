"""`pybitnet info MODEL`: architecture, parameters, layout and bytes of a model."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    app.command("info")(info)


def info(model: str = typer.Argument(..., help="Hub id (org/name) or local model directory.")) -> None:
    """Print a model's architecture, parameter counts, weight layout and bytes."""
    raise typer.Exit(1)

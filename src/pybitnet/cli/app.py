"""The `pybitnet` command: a typer app with one small module per verb (each calls the library)."""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    name="pybitnet",
    help="BitNet b1.58 ternary language models: run, chat, serve, benchmark, convert and train them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Each module defines `register(app)`; listing them here is the only wiring a new verb needs.
VERB_MODULES = (
    "info",
    "create_dummy",
    "convert",
    "train",
    "run",
    "chat",
    "generate",
    "pull",
    "list_models",
    "rm",
    "bench",
    "serve",
)


def _register_verbs() -> None:
    for name in VERB_MODULES:
        importlib.import_module(f"pybitnet.cli.{name}").register(app)


def main() -> None:
    _register_verbs()
    app()

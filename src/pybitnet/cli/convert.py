"""`pybitnet convert MODEL OUT.gguf --type tq2_0|tq1_0`: a HF BitNet checkpoint as a GGUF file for llama.cpp
(llama-style models) or bitnet.cpp (2B-4T-style models)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

WEIGHT_TYPES = ("tq2_0", "tq1_0")
EMBED_TYPES = ("f16", "q8_0")


def register(app: typer.Typer) -> None:
    app.command("convert")(convert)


def convert(
    model: Annotated[str, typer.Argument(help="Hub id (org/name) or local HF checkpoint directory.")],
    output: Annotated[Path, typer.Argument(help="GGUF file to write.")],
    weight_type: Annotated[
        str, typer.Option("--type", "-t", help=f"Ternary weight type: {', '.join(WEIGHT_TYPES)}.")
    ] = "tq2_0",
    embed_type: Annotated[
        str,
        typer.Option("--embed-type", help=f"Embeddings and untied output head: {', '.join(EMBED_TYPES)}."),
    ] = "f16",
) -> None:
    """Write a GGUF file with TQ2_0/TQ1_0 ternary weights, F32 norms, F16 (or Q8_0) embeddings, the tokenizer
    and the chat template: llama-style models as llama.cpp's `llama`, 2B-4T-style as `bitnet-b1.58`."""
    from ..errors import PyBitNetError
    from ..formats.gguf_export import convert_hf_to_gguf
    from ..hub import resolve_model

    for flag, value, allowed in (
        ("--type", weight_type, WEIGHT_TYPES),
        ("--embed-type", embed_type, EMBED_TYPES),
    ):
        if value not in allowed:
            typer.echo(f"error: {flag} must be one of {', '.join(allowed)}, not {value!r}", err=True)
            raise typer.Exit(2)
    try:
        path = convert_hf_to_gguf(resolve_model(model), output, weight_type, embed_type)
    except PyBitNetError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    size = path.stat().st_size / 2**20
    typer.echo(f"wrote {path} ({size:.1f} MiB, {weight_type} weights, {embed_type} embeddings)")

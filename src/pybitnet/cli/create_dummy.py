"""`pybitnet create-dummy --preset NAME OUT_DIR`: a random-ternary checkpoint with a working tokenizer."""

from __future__ import annotations

from pathlib import Path

import typer

DTYPES = ("bfloat16", "float16", "float32")


def register(app: typer.Typer) -> None:
    app.command("create-dummy")(create_dummy)


def create_dummy(
    out_dir: Path = typer.Argument(..., help="Directory to write the checkpoint into (created if missing)."),
    preset: str = typer.Option(
        "tiny-bitnet", "--preset", "-p", help="Model shape: bitnet-2b-4t, tiny-bitnet, tiny-llama, tiny-legacy, ..."
    ),
    seed: int = typer.Option(0, "--seed", help="Random seed of the weights."),
    dtype: str = typer.Option("bfloat16", "--dtype", help=f"Dtype of the float tensors: {', '.join(DTYPES)}."),
) -> None:
    """Write a random-ternary model in the exact HF packed format (config, safetensors, tokenizer files)
    that pybitnet and transformers both load. Presets have real shapes (e.g. bitnet-2b-4t)."""
    import torch

    from ..errors import PyBitNetError
    from ..models.dummy import create_dummy as make
    from ..models.presets import PRESETS

    if preset not in PRESETS:
        typer.echo(f"error: unknown preset {preset!r}; known presets: {', '.join(sorted(PRESETS))}", err=True)
        raise typer.Exit(2)
    if dtype not in DTYPES:
        typer.echo(f"error: --dtype must be one of {', '.join(DTYPES)}, not {dtype!r}", err=True)
        raise typer.Exit(2)
    try:
        path = make(preset, out_dir, seed=seed, dtype=getattr(torch, dtype))
    except PyBitNetError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    typer.echo(f"wrote {preset} (seed {seed}) to {path} ({size / 2**20:.1f} MiB)")

"""`pybitnet create-dummy --preset NAME OUT_DIR`: a random-ternary checkpoint with a working tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

DTYPES = ("bfloat16", "float16", "float32")


def register(app: typer.Typer) -> None:
    app.command("create-dummy")(create_dummy)


OutDir = Annotated[Path, typer.Argument(help="Directory to write the checkpoint into (created if missing).")]
Preset = Annotated[
    str,
    typer.Option(
        "--preset", "-p", help="Model shape: bitnet-2b-4t, tiny-bitnet, tiny-llama, tiny-legacy, ..."
    ),
]
Seed = Annotated[int, typer.Option("--seed", help="Random seed of the weights.")]
Dtype = Annotated[str, typer.Option("--dtype", help=f"Dtype of the float tensors: {', '.join(DTYPES)}.")]


def create_dummy(
    out_dir: OutDir, preset: Preset = "tiny-bitnet", seed: Seed = 0, dtype: Dtype = "bfloat16"
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

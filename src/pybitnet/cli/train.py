"""`pybitnet train --config recipe.yaml [--key value ...]`: train or fine-tune a BitNet model."""

from __future__ import annotations

import os
import sys

import typer

from ..errors import PyBitNetError

HELP = """Train a BitNet b1.58 model from a YAML recipe; every recipe key is also a flag that overrides it.

Run on several GPUs (or CPU processes) with torchrun: `torchrun --nproc-per-node 2 -m pybitnet.train ...`.
Example recipes live in the recipes/ folder of the source tree.
"""


def register(app: typer.Typer) -> None:
    app.command(
        "train",
        help=HELP,
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
        add_help_option=False,
    )(train)


def train(ctx: typer.Context) -> None:
    code = run_from_argv(list(ctx.args))
    if code:
        raise typer.Exit(code)


def _split_config(argv: list[str]) -> tuple[str | None, list[str]]:
    recipe, rest, i = None, [], 0
    while i < len(argv):
        if argv[i] in ("--config", "-c") and i + 1 < len(argv):
            recipe, i = argv[i + 1], i + 2
        elif argv[i].startswith("--config="):
            recipe, i = argv[i].split("=", 1)[1], i + 1
        else:
            rest.append(argv[i])
            i += 1
    return recipe, rest


def run_from_argv(argv: list[str]) -> int:
    """Parse `--config` and the key flags, train, print where the results went; errors -> exit code 2."""
    from ..train.cli_args import build_config, keys_help

    if "--help" in argv or "-h" in argv:
        print(HELP + "\nOptions:\n  --config PATH  the YAML recipe\n  " + keys_help().replace("\n", "\n  "))
        return 0
    recipe, flags = _split_config(argv)
    try:
        cfg = build_config(recipe, flags)
        from ..train import train

        result = train(cfg)
    except PyBitNetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    summary = f"trained {result.steps} steps"
    if result.losses:
        summary += f", final loss {result.losses[max(result.losses)]:.4f}"
    if result.val_loss is not None:
        summary += f", val loss {result.val_loss:.4f} (ppl {result.val_ppl:.2f})"
    print(summary)
    for kind, path in result.exported.items():
        print(f"{kind}: {path}")
    if result.stopped_by is not None:  # the shell's convention for "ended by a signal"
        print(f"stopped early by signal {result.stopped_by}; run the same command to resume")
        return 128 + result.stopped_by
    return 0

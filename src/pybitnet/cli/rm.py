"""`pybitnet rm ID...`: delete models from the Hugging Face cache."""

from __future__ import annotations

import shutil
from typing import Annotated

import typer
from rich.markup import escape

from ..errors import ModelNotFoundError
from .common import cached_models, err, user_errors


def register(app: typer.Typer) -> None:
    app.command("rm")(rm)


IdsArg = Annotated[list[str], typer.Argument(metavar="ID...", help="Hub ids of cached models.")]


def rm(model_ids: IdsArg) -> None:
    """Delete models (every cached revision) from the Hugging Face cache."""
    with user_errors():
        repos = {r.repo_id: r for r in cached_models()}
        missing = [m for m in model_ids if m not in repos]
        if missing:
            known = ", ".join(sorted(repos)) or "none"
            raise ModelNotFoundError(
                f"not in the Hugging Face cache: {', '.join(missing)} (cached models: {known})"
            )
    for m in model_ids:
        # every revision goes, so the repo's whole cache folder (blobs, snapshots, refs) goes
        shutil.rmtree(repos[m].repo_path)
        err.print(f"deleted {escape(m)} ({repos[m].size_on_disk_str} freed)")

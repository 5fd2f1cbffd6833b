"""`pybitnet list`: the models in the Hugging Face cache."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

from .common import cached_models


def register(app: typer.Typer) -> None:
    app.command("list")(list_models)


def list_models() -> None:
    """List the models in the Hugging Face cache, with their size and when they were last changed."""
    repos = cached_models()
    console = Console(highlight=False)
    if not repos:
        console.print("No models in the Hugging Face cache.")
        return
    table = Table(box=None, pad_edge=False)
    for column in ("NAME", "SIZE", "FILES", "MODIFIED"):
        table.add_column(column, no_wrap=True)
    for repo in sorted(repos, key=lambda r: r.repo_id.lower()):
        table.add_row(repo.repo_id, repo.size_on_disk_str, str(repo.nb_files), repo.last_modified_str)
    console.print(table)

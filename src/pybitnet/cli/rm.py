"""`pybitnet rm ID...`: delete models from the Hugging Face cache."""

from __future__ import annotations

import typer
from rich.markup import escape

from ..errors import ModelNotFoundError
from .common import cached_models, err, hf_cache_dir, user_errors


def register(app: typer.Typer) -> None:
    app.command("rm")(rm)


def rm(model_ids: list[str] = typer.Argument(..., metavar="ID...", help="Hub ids of cached models.")) -> None:
    """Delete models (every cached revision) from the Hugging Face cache."""
    from huggingface_hub import scan_cache_dir

    with user_errors():
        repos = {r.repo_id: r for r in cached_models()}
        missing = [m for m in model_ids if m not in repos]
        if missing:
            known = ", ".join(sorted(repos)) or "none"
            raise ModelNotFoundError(f"not in the Hugging Face cache: {', '.join(missing)} (cached models: {known})")
        hashes = [rev.commit_hash for m in model_ids for rev in repos[m].revisions]
        strategy = scan_cache_dir(hf_cache_dir()).delete_revisions(*hashes)
        freed = strategy.expected_freed_size_str
        strategy.execute()  # a repo whose every revision goes is removed whole
    err.print(f"deleted {escape(', '.join(model_ids))} ({freed} freed)")

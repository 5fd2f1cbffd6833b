"""Model id or path -> local directory, through the Hugging Face cache (honours HF_HOME, HF_HUB_OFFLINE)."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import ModelNotFoundError

ALLOW_PATTERNS = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
]


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def resolve_model(model: str | Path, revision: str | None = None, download: bool = True) -> Path:
    """A local directory holding the model's files: `model` itself if it is a directory or file, else a hub
    repo id looked up in the HF cache and, unless offline or `download` is False, downloaded into it."""
    path = Path(model).expanduser()
    if path.exists():
        return path
    repo_id = str(model)
    if repo_id.count("/") != 1 or repo_id.startswith(("/", ".", "~")):
        raise ModelNotFoundError(
            f"{repo_id!r} is neither an existing path nor a hub id of the form 'org/name'"
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    local_only = offline() or not download
    try:
        return Path(
            snapshot_download(
                repo_id, revision=revision, allow_patterns=ALLOW_PATTERNS, local_files_only=local_only
            )
        )
    except LocalEntryNotFoundError:
        if offline():
            why = "HF_HUB_OFFLINE is set"
        elif not download:
            why = "downloading was not allowed"
        else:
            why = "the hub could not be reached"
        raise ModelNotFoundError(
            f"model {repo_id!r} is not in the Hugging Face cache ({_cache_dir()}) and {why}; "
            f"run `pybitnet pull {repo_id}` on a machine with network access, or pass a local directory"
        ) from None
    except RepositoryNotFoundError:
        raise ModelNotFoundError(f"no model {repo_id!r} on the Hugging Face hub (or it is private)") from None
    except (HfHubHTTPError, OSError) as e:
        raise ModelNotFoundError(f"could not fetch {repo_id!r} from the hub: {e}") from None


def _cache_dir() -> str:
    from huggingface_hub.constants import HF_HUB_CACHE

    return str(HF_HUB_CACHE)

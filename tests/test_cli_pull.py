"""`pybitnet pull`, `list` and `rm` on a local Hugging Face cache (no hub is reachable in tests)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from test_engine_helpers import cli_app, model_dir

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def add_to_cache(cache: Path, repo_id: str, source: Path, commit: str = COMMIT) -> Path:
    """Lay out `source`'s files as huggingface_hub stores a snapshot: blobs, snapshot symlinks, refs/main."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    for f in source.iterdir():
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / f.name).symlink_to(Path("..") / ".." / "blobs" / blob.name)
    return snapshot


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


def invoke(args: list[str]):
    return CliRunner().invoke(cli_app(), args)


def test_list_and_rm(cache):
    assert "No models in the Hugging Face cache." in invoke(["list"]).stdout
    add_to_cache(cache, "acme/tiny-bitnet", model_dir("tiny-bitnet"))
    add_to_cache(cache, "acme/tiny-llama", model_dir(), commit="f" * 40)
    listing = invoke(["list"])
    assert listing.exit_code == 0
    assert "acme/tiny-bitnet" in listing.stdout and "acme/tiny-llama" in listing.stdout
    assert "NAME" in listing.stdout and "SIZE" in listing.stdout
    removed = invoke(["rm", "acme/tiny-bitnet"])
    assert removed.exit_code == 0 and "deleted acme/tiny-bitnet" in removed.stderr
    assert not (cache / "models--acme--tiny-bitnet").exists()
    listing = invoke(["list"])
    assert "acme/tiny-bitnet" not in listing.stdout and "acme/tiny-llama" in listing.stdout


def test_rm_unknown_model(cache):
    add_to_cache(cache, "acme/tiny-llama", model_dir())
    result = invoke(["rm", "acme/nothing"])
    assert result.exit_code == 1
    assert (
        "not in the Hugging Face cache: acme/nothing" in result.stderr and "acme/tiny-llama" in result.stderr
    )
    assert (cache / "models--acme--tiny-llama").exists()


def test_pull_downloads_into_the_cache(cache, monkeypatch):
    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None, local_files_only=False, **kwargs):
        calls.append((repo_id, revision, local_files_only, allow_patterns))
        return str(add_to_cache(cache, repo_id, model_dir()))

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    result = invoke(["pull", "acme/pulled-model"])
    assert result.exit_code == 0, result.output
    assert "pulled acme/pulled-model" in result.stderr
    repo_id, revision, local_only, patterns = calls[0]
    assert (repo_id, revision, local_only) == ("acme/pulled-model", None, False)
    assert "*.safetensors" in patterns and "tokenizer.json" in patterns
    assert "acme/pulled-model" in invoke(["list"]).stdout


def test_pull_errors(cache, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    offline = invoke(["pull", "acme/not-cached-anywhere"])
    assert offline.exit_code == 1 and "HF_HUB_OFFLINE is set" in " ".join(offline.stderr.split())
    local = invoke(["pull", str(tmp_path)])
    assert local.exit_code == 1 and "is a local path" in " ".join(local.stderr.split())
    bad = invoke(["pull", "not-a-hub-id"])
    assert bad.exit_code == 1 and "neither an existing path nor a hub id" in " ".join(bad.stderr.split())

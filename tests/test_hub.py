"""Model id or path -> local files through the Hugging Face cache (HF_HOME, HF_HUB_OFFLINE); no network."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pybitnet
from pybitnet.errors import ModelNotFoundError
from pybitnet.hub import resolve_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _cache_model(hub_cache: Path, repo_id: str, files_from: Path) -> Path:
    """Lay out `files_from` as huggingface_hub caches a downloaded snapshot of `repo_id`."""
    repo = hub_cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    shutil.copytree(files_from, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


@pytest.fixture
def offline_cache(monkeypatch, tmp_path) -> Path:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


def test_local_directory_passes_through(dummy_dir):
    path = dummy_dir("tiny-bitnet")
    assert resolve_model(path) == path
    assert resolve_model(str(path)) == path


@pytest.mark.parametrize("bad", ["no-slash", "a/b/c", "./missing/dir"])
def test_neither_path_nor_hub_id(bad):
    with pytest.raises(
        ModelNotFoundError, match="neither an existing path nor a hub id of the form 'org/name'"
    ):
        resolve_model(bad)


def test_cached_model_resolves_and_loads_offline(offline_cache, dummy_dir):
    snapshot = _cache_model(offline_cache, "someorg/tiny", dummy_dir("tiny-bitnet"))
    assert resolve_model("someorg/tiny") == snapshot
    model = pybitnet.load_model("someorg/tiny", kernel="reference")
    assert model(torch.tensor([[1, 2, 3]])).shape == (1, 3, 512)


def test_offline_and_not_cached(offline_cache):
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model("someorg/absent")
    message = str(info.value)
    assert "not in the Hugging Face cache" in message and str(offline_cache) in message
    assert "HF_HUB_OFFLINE is set" in message and "pybitnet pull someorg/absent" in message


def test_no_download_without_network_access(offline_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    with pytest.raises(
        ModelNotFoundError, match=r"not in the Hugging Face cache .* downloading was not allowed"
    ):
        resolve_model("someorg/absent", download=False)


def test_hf_home_is_honoured_in_a_fresh_process(dummy_dir, tmp_path):
    """HF_HOME and HF_HUB_OFFLINE as a user sets them, read by huggingface_hub at import."""
    _cache_model(tmp_path / "home" / "hub", "someorg/tiny", dummy_dir("tiny-llama"))
    code = (
        "import json, pybitnet.hub as h\n"
        "from pybitnet.errors import ModelNotFoundError\n"
        "out = {'found': str(h.resolve_model('someorg/tiny'))}\n"
        "try:\n    h.resolve_model('someorg/absent')\n"
        "except ModelNotFoundError as e:\n    out['error'] = str(e)\n"
        "print(json.dumps(out))\n"
    )
    env = {**os.environ, "HF_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["found"] == str(tmp_path / "home" / "hub" / "models--someorg--tiny" / "snapshots" / COMMIT)
    assert str(tmp_path / "home" / "hub") in out["error"]

"""Bad input raises typed errors (pybitnet.errors) whose messages say what is wrong and what to do."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import pybitnet
from pybitnet.errors import (
    ConfigError,
    ModelNotFoundError,
    PyBitNetError,
    UnsupportedModelError,
    WeightsError,
)
from pybitnet.formats.hf import save_hf_model
from pybitnet.models import ModelConfig


@pytest.fixture
def model_copy(dummy_dir, tmp_path) -> Path:
    """A private copy of the tiny-bitnet dummy to damage."""
    return Path(shutil.copytree(dummy_dir("tiny-bitnet"), tmp_path / "model"))


def _edit_config(path: Path, **changes) -> None:
    cfg = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (path / "config.json").write_text(json.dumps(cfg))


def _load(path):
    return pybitnet.load_model(path, kernel="reference")


def test_all_errors_share_the_base_class():
    assert issubclass(UnsupportedModelError, ConfigError)
    for cls in (ConfigError, ModelNotFoundError, WeightsError):
        assert issubclass(cls, PyBitNetError)


def test_missing_config(model_copy):
    (model_copy / "config.json").unlink()
    with pytest.raises(ConfigError, match=r"no config.json in .*pybitnet pull"):
        _load(model_copy)


def test_missing_directory(tmp_path):
    with pytest.raises(ModelNotFoundError, match="neither an existing path nor a hub id"):
        _load(tmp_path / "nowhere")


def test_file_that_is_not_a_model(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\0" * 16)
    with pytest.raises(ModelNotFoundError, match="is not a model directory"):
        _load(tmp_path / "weights.bin")


def test_missing_weights(model_copy):
    (model_copy / "model.safetensors").unlink()
    with pytest.raises(WeightsError, match=r"no weights in .*expected model.safetensors"):
        _load(model_copy)


@pytest.mark.parametrize("text", ["{not json", "", '["a", "list"]', "\xff\xfe"])
def test_invalid_json(model_copy, text):
    (model_copy / "config.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(ConfigError, match=r"config.json"):
        _load(model_copy)


def test_unknown_model_type(model_copy):
    _edit_config(model_copy, model_type="gpt2", architectures=["GPT2LMHeadModel"])
    with pytest.raises(UnsupportedModelError, match=r"model_type 'gpt2'.*expected model_type 'bitnet'"):
        _load(model_copy)


def test_llama_without_bitnet_quantization_is_not_ternary(model_copy):
    _edit_config(model_copy, model_type="llama", architectures=["LlamaForCausalLM"], quantization_config=None)
    with pytest.raises(UnsupportedModelError, match="quant_method 'bitnet'"):
        _load(model_copy)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"hidden_size": None}, "lacks the required key 'hidden_size'"),
        ({"hidden_size": -128}, "hidden_size must be a positive integer"),
        ({"num_hidden_layers": 2.5}, "num_hidden_layers must be a positive integer"),
        ({"vocab_size": "512"}, "vocab_size must be a positive integer"),
        ({"vocab_size": 10**12}, "vocab_size must be a positive integer"),
        ({"num_key_value_heads": 3}, "must be a multiple of num_key_value_heads"),
        ({"head_dim": 31}, "head_dim must be even"),
        ({"rms_norm_eps": "tiny"}, "wrong type"),
        ({"rms_norm_eps": -1.0}, "rms_norm_eps must be a positive number"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
        ({"quantization_config": "bitnet"}, "quantization_config must be a JSON dict"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "rope_type 'yarn' is not supported"),
        ({"rope_scaling": {"rope_type": "llama3"}}, "llama3 rope scaling lacks factor"),
    ],
)
def test_invalid_config_values(model_copy, changes, match):
    _edit_config(model_copy, **changes)
    with pytest.raises(ConfigError, match=match):
        _load(model_copy)


def _rewrite_tensor(path: Path, name: str, tensor: torch.Tensor | None) -> None:
    tensors = load_file(path / "model.safetensors")
    if tensor is None:
        del tensors[name]
    else:
        tensors[name] = tensor
    save_file(tensors, path / "model.safetensors")


@pytest.mark.parametrize(
    ("name", "tensor", "match"),
    [
        (
            "model.layers.0.mlp.up_proj.weight",
            torch.zeros(80, 128, dtype=torch.uint8),
            r"packed shape \(80, 128\)",
        ),
        ("model.layers.0.mlp.up_proj.weight", torch.zeros(352, 127), r"shape \(352, 127\) does not match"),
        (
            "model.layers.0.mlp.up_proj.weight",
            torch.zeros(352, 128, dtype=torch.int32),
            "neither packed uint8",
        ),
        ("model.layers.0.mlp.up_proj.weight", None, "'model.layers.0.mlp.up_proj.weight' is missing"),
        (
            "model.embed_tokens.weight",
            torch.zeros(500, 128),
            r"model.embed_tokens.weight: shape \(500, 128\)",
        ),
        ("model.norm.weight", torch.zeros(128, dtype=torch.int64), "is not floating point"),
        ("model.layers.1.self_attn.o_proj.weight_scale", torch.zeros(1), "not a finite non-zero number"),
        (
            "model.layers.1.self_attn.o_proj.weight_scale",
            torch.tensor([float("nan")]),
            "not a finite non-zero",
        ),
        ("model.layers.1.self_attn.o_proj.weight_scale", torch.ones(3), "expected one floating-point value"),
    ],
)
def test_wrong_tensors(model_copy, name, tensor, match):
    _rewrite_tensor(model_copy, name, tensor)
    with pytest.raises(WeightsError, match=match):
        _load(model_copy)


def test_unpacked_weights_with_a_scale_must_be_ternary(model_copy):
    _rewrite_tensor(model_copy, "model.layers.0.mlp.up_proj.weight", torch.full((352, 128), 0.5))
    with pytest.raises(WeightsError, match=r"has a weight_scale but its values are not all in \{-1, 0, 1\}"):
        _load(model_copy)


def _truncate(f: Path) -> None:
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _garbage(f: Path) -> None:
    f.write_bytes(bytes(range(256)) * 8)


def _bad_header_json(f: Path) -> None:
    data = bytearray(f.read_bytes())
    data[8:12] = b"{{{{"
    f.write_bytes(bytes(data))


def _offset_past_the_end(f: Path) -> None:
    data = f.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    first = next(k for k in header if k != "__metadata__")
    header[first]["data_offsets"][1] += 10**9
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    f.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


@pytest.mark.parametrize("damage", [_truncate, _garbage, _bad_header_json, _offset_past_the_end, Path.unlink])
def test_truncated_or_corrupt_safetensors(model_copy, damage):
    target = model_copy / "model.safetensors"
    if damage is Path.unlink:
        target.write_bytes(b"")
    else:
        damage(target)
    with pytest.raises(WeightsError, match=r"not a readable safetensors file .*truncated or corrupt"):
        _load(model_copy)


def _shard(dummy_dir, tmp_path) -> Path:
    save_hf_model(pybitnet.load_model(dummy_dir("tiny-bitnet")), tmp_path, max_shard_bytes=100_000)
    return tmp_path


def _shard_names(path: Path) -> list[str]:
    return sorted(set(json.loads((path / "model.safetensors.index.json").read_text())["weight_map"].values()))


def test_index_naming_a_missing_shard(dummy_dir, tmp_path):
    path = _shard(dummy_dir, tmp_path)
    second = _shard_names(path)[1]
    (path / second).unlink()
    with pytest.raises(WeightsError, match=f"shard {second} listed in .* is missing"):
        _load(path)


def test_index_naming_a_shard_outside_the_directory(dummy_dir, tmp_path):
    path = _shard(dummy_dir, tmp_path)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.norm.weight"] = "../elsewhere.safetensors"
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(WeightsError, match="outside the model directory"):
        _load(path)


def test_index_that_is_not_json_or_has_no_map(dummy_dir, tmp_path):
    path = _shard(dummy_dir, tmp_path)
    (path / "model.safetensors.index.json").write_text("{}")
    with pytest.raises(WeightsError, match="has no 'weight_map'"):
        _load(path)
    (path / "model.safetensors.index.json").write_text("[")
    with pytest.raises(ConfigError, match="is not valid JSON"):
        _load(path)


def test_index_naming_a_tensor_its_shard_lacks(dummy_dir, tmp_path):
    path = _shard(dummy_dir, tmp_path)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    first = _shard_names(path)[0]
    assert index["weight_map"]["model.norm.weight"] != first
    index["weight_map"]["model.norm.weight"] = first
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(WeightsError, match=f"cannot read tensor 'model.norm.weight' from {first}"):
        _load(path)


def test_hub_id_while_offline_and_not_cached(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(
        ModelNotFoundError, match=r"not in the Hugging Face cache .*HF_HUB_OFFLINE is set.*pull"
    ):
        pybitnet.load_model("microsoft/bitnet-b1.58-2B-4T")


def test_config_errors_name_the_field_for_direct_construction():
    with pytest.raises(ConfigError, match="intermediate_size must be a positive integer"):
        ModelConfig(intermediate_size=0)
    with pytest.raises(UnsupportedModelError, match="unknown model family 'gpt'"):
        ModelConfig(family="gpt")

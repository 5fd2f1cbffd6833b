"""Logits of every family equal transformers' (max|Δ|/max|ref| <= 1e-4 in fp32, reference kernel), in both
directions of saving and loading; the KV cache path equals the full forward."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import pybitnet
from conftest import rel_err
from pybitnet.formats.hf import save_hf_model
from transformers_helpers import legacy_as_transformers

TOL = 1e-4


def _ids(batch: int = 2, length: int = 11, vocab: int = 512, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def _ref_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


def _ours(path: Path) -> torch.nn.Module:
    return pybitnet.load_model(path, dtype=torch.float32, kernel="reference")


FAMILIES = [
    pytest.param("tiny-bitnet", {}, id="bitnet-2b4t-style-tied-autobitlinear"),
    pytest.param(
        "tiny-bitnet", {"tie_word_embeddings": False, "linear_class": "bitlinear"}, id="bitnet-untied"
    ),
    pytest.param("tiny-llama", {}, id="llama-bitlinear-untied"),
    pytest.param(
        "tiny-llama", {"linear_class": "autobitlinear", "tie_word_embeddings": True}, id="llama-auto-tied"
    ),
]


@pytest.mark.parametrize(("name", "overrides"), FAMILIES)
def test_logits_equal_transformers(dummy_dir, hf_reference, name, overrides):
    path = dummy_dir(name, **overrides)
    ids = _ids()
    ref = hf_reference(path)
    assert type(ref).__name__ == ("BitNetForCausalLM" if name == "tiny-bitnet" else "LlamaForCausalLM")
    linear = type(ref.model.layers[0].mlp.gate_proj).__name__
    assert (
        linear
        == {"autobitlinear": "AutoBitLinear", "bitlinear": "BitLinear"}[
            overrides.get("linear_class", "autobitlinear" if name == "tiny-bitnet" else "bitlinear")
        ]
    )
    assert rel_err(_ours(path)(ids), _ref_logits(ref, ids)) <= TOL


def test_legacy_latent_logits_equal_transformers(dummy_dir, hf_reference, tmp_path):
    legacy = dummy_dir("tiny-legacy")
    names = load_file(legacy / "model.safetensors").keys()
    assert "model.layers.0.self_attn.inner_attn_ln.weight" in names
    assert "model.layers.0.mlp.ffn_layernorm.weight" in names
    ref = hf_reference(legacy_as_transformers(legacy, tmp_path / "hf"))
    assert type(ref.model.layers[0].mlp.up_proj).__name__ == "AutoBitLinear"
    ids = _ids()
    assert rel_err(_ours(legacy)(ids), _ref_logits(ref, ids)) <= TOL


@pytest.mark.parametrize(
    ("name", "overrides"),
    [
        pytest.param("tiny-bitnet", {}, id="bitnet"),
        pytest.param("tiny-llama", {}, id="llama-bitlinear"),
        pytest.param("tiny-legacy", {}, id="legacy-saved-packed"),
    ],
)
def test_transformers_loads_what_pybitnet_saves(dummy_dir, hf_reference, tmp_path, name, overrides):
    """Load (any form) -> save_hf_model (packed) -> transformers agrees with the model pybitnet saved."""
    model = _ours(dummy_dir(name, **overrides))
    save_hf_model(model, tmp_path / "saved")
    ids = _ids(seed=1)
    assert rel_err(model(ids), _ref_logits(hf_reference(tmp_path / "saved"), ids)) <= TOL
    assert rel_err(_ours(tmp_path / "saved")(ids), model(ids)) == 0.0


def test_pybitnet_loads_transformers_save_pretrained(dummy_dir, hf_reference, tmp_path):
    ref = hf_reference(dummy_dir("tiny-llama"))
    ref.save_pretrained(tmp_path / "hf")
    written = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert "rope_parameters" in written  # transformers 5 writes the new RoPE form
    ids = _ids(seed=2)
    assert rel_err(_ours(tmp_path / "hf")(ids), _ref_logits(ref, ids)) <= TOL


def test_pybitnet_loads_transformers_online_latent_save(dummy_dir, hf_reference, tmp_path):
    """A QAT checkpoint from transformers (AutoBitLinear, online): latent float weights, no weight_scale."""
    ref = hf_reference(legacy_as_transformers(dummy_dir("tiny-legacy"), tmp_path / "hf"))
    ref.save_pretrained(tmp_path / "saved")
    ids = _ids(seed=3)
    assert rel_err(_ours(tmp_path / "saved")(ids), _ref_logits(ref, ids)) <= TOL


def test_pybitnet_loads_transformers_unpacked_autobitlinear_state(dummy_dir, hf_reference, tmp_path):
    """transformers holds AutoBitLinear weights unpacked: ternary floats + weight_scale, as 4.x wrote them."""
    path = dummy_dir("tiny-bitnet")
    ref = hf_reference(path)
    out = tmp_path / "unpacked"
    out.mkdir()
    state = {k: v.contiguous() for k, v in ref.state_dict().items() if k != "lm_head.weight"}
    assert state["model.layers.0.mlp.up_proj.weight"].dtype == torch.float32
    save_file(state, out / "model.safetensors")
    shutil.copy(path / "config.json", out / "config.json")
    ids = _ids(seed=4)
    assert rel_err(_ours(out)(ids), _ref_logits(ref, ids)) <= TOL


def test_sharded_checkpoint_loads_in_both(dummy_dir, hf_reference, tmp_path):
    model = _ours(dummy_dir("tiny-llama"))
    save_hf_model(model, tmp_path, max_shard_bytes=200_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 2 and not (tmp_path / "model.safetensors").exists()
    assert all((tmp_path / s).is_file() for s in shards)
    ids = _ids(seed=5)
    assert rel_err(_ours(tmp_path)(ids), model(ids)) == 0.0
    assert rel_err(model(ids), _ref_logits(hf_reference(tmp_path), ids)) <= TOL


@pytest.mark.parametrize("form", ["rope_theta", "rope_parameters"])
def test_rope_config_forms_agree_with_transformers(dummy_dir, hf_reference, tmp_path, form):
    """Both the 4.x (rope_theta) and 5.x (rope_parameters) config forms, with a non-default theta."""
    src = dummy_dir("tiny-bitnet")
    shutil.copytree(src, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg.pop("rope_theta")
    if form == "rope_theta":
        cfg["rope_theta"] = 1234.0
    else:
        cfg["rope_parameters"] = {"rope_theta": 1234.0, "rope_type": "default"}
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    ours = _ours(tmp_path / "m")
    assert ours.config.rope_theta == 1234.0
    ids = _ids(seed=6)
    assert rel_err(ours(ids), _ref_logits(hf_reference(tmp_path / "m"), ids)) <= TOL
    assert rel_err(ours(ids), _ours(src)(ids)) > 1e-3  # theta matters, so the test could fail


# --- KV cache: the interface the engine drives ---


@pytest.mark.parametrize("name", ["tiny-bitnet", "tiny-llama"])
def test_cache_prefill_then_decode_equals_full_forward(dummy_dir, name):
    model = _ours(dummy_dir(name))
    ids = _ids(batch=2, length=12, seed=7)
    full = model(ids)
    cache = model.new_cache(batch_size=2, max_len=32)
    prefill = 7
    positions = torch.arange(prefill).expand(2, -1)
    steps = [model(ids[:, :prefill], positions, cache)]
    for t in range(prefill, ids.shape[1]):
        steps.append(model(ids[:, t : t + 1], torch.full((2, 1), t), cache))
    assert rel_err(torch.cat(steps, dim=1), full) <= 1e-5


def test_batch_of_different_lengths_equals_each_alone(dummy_dir):
    """Right-padded prompts of lengths 3, 9, 6 with per-row positions, prefilled together then decoded
    together: each row's logits equal that prompt run alone."""
    model = _ours(dummy_dir("tiny-bitnet"))
    lengths = [3, 9, 6]
    prompts = [_ids(batch=1, length=n, seed=10 + i)[0] for i, n in enumerate(lengths)]
    width = max(lengths)
    batch = torch.zeros((3, width), dtype=torch.long)
    for i, p in enumerate(prompts):
        batch[i, : len(p)] = p
    cache = model.new_cache(batch_size=3, max_len=24)
    prefill = model(batch, torch.arange(width).expand(3, -1), cache)
    nxt = torch.tensor([[5], [17], [42]])
    decode = model(nxt, torch.tensor(lengths)[:, None], cache)
    for i, p in enumerate(prompts):
        alone = model(torch.cat([p, nxt[i]])[None])
        assert rel_err(prefill[i, : len(p)], alone[0, : len(p)]) <= 1e-5
        assert rel_err(decode[i, 0], alone[0, -1]) <= 1e-5

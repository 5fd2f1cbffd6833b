"""`pybitnet info MODEL`: architecture, parameter counts, layout and bytes, from headers only."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner


def _info(cli_app, *args: str):
    return CliRunner().invoke(cli_app, ["info", *args], env={"COLUMNS": "200"})


def test_info_table_for_the_2b4t_style_dummy(cli_app, dummy_dir):
    path = dummy_dir("tiny-bitnet", dtype=torch.bfloat16)
    result = _info(cli_app, str(path))
    assert result.exit_code == 0, result.output
    out = result.output
    for expected in (
        "BitNetForCausalLM (family bitnet: relu², sub-norms)",
        "layers",
        "hidden size",
        "4 query, 2 key/value, head dim 32",
        "512 (bos 1, eos 2)",
        "tied (lm_head = embed_tokens)",
        "368.64K (368,640)",  # ternary parameters
        "HF packed 2-bit (uint8, 4 per byte), weight_scale multiplies (autobitlinear)",
        "bits per ternary weight",
        "ternary U8 tensors",
        "float BF16 tensors",
    ):
        assert expected in out, expected
    size = (path / "model.safetensors").stat().st_size
    assert f"{size:,} bytes" in out


def test_info_json_for_llama_and_legacy(cli_app, dummy_dir):
    llama = json.loads(_info(cli_app, str(dummy_dir("tiny-llama")), "--json").output)
    assert llama["family"] == "llama" and llama["architecture"] == "LlamaForCausalLM"
    assert "weight_scale divides (bitlinear)" in llama["layout"]
    assert llama["bits_per_ternary_weight"] == 2.0
    assert llama["config"]["num_hidden_layers"] == 2 and llama["config"]["tie_word_embeddings"] is False
    legacy = json.loads(_info(cli_app, str(dummy_dir("tiny-legacy")), "--json").output)
    assert legacy["family"] == "legacy" and legacy["architecture"] == "BitnetForCausalLM"
    assert legacy["layout"] == "latent F32 weights, ternarized at load (absmean)"
    assert legacy["bits_per_ternary_weight"] == 32.0
    assert legacy["weight_bytes"] < legacy["total_bytes"]


def test_info_counts_sharded_checkpoints(cli_app, dummy_dir, tmp_path):
    import pybitnet
    from pybitnet.formats.hf import save_hf_model

    save_hf_model(pybitnet.load_model(dummy_dir("tiny-llama")), tmp_path, max_shard_bytes=150_000)
    data = json.loads(_info(cli_app, str(tmp_path), "--json").output)
    shards = [f for f in data["files"] if f.endswith(".safetensors")]
    assert len(shards) > 1 and data["weight_bytes"] == sum(data["files"][f] for f in shards)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["/definitely/not/here"], "neither an existing path nor a hub id"),
        (["someorg/absent"], "HF_HUB_OFFLINE is set"),
    ],
)
def test_info_errors_exit_1_with_the_message(cli_app, monkeypatch, tmp_path, args, message):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    result = _info(cli_app, *args)
    assert result.exit_code == 1
    assert "error:" in result.output and message in " ".join(result.output.split())
    assert "Traceback" not in result.output


def test_info_on_a_directory_without_config(cli_app, tmp_path):
    result = _info(cli_app, str(tmp_path))
    assert result.exit_code == 1 and "no config.json" in result.output


def test_info_reads_gguf_files(cli_app, dummy_dir, tmp_path):
    gguf_export = pytest.importorskip("pybitnet.formats.gguf_export")
    src = dummy_dir("tiny-llama", hidden_size=256, intermediate_size=512, num_hidden_layers=1)
    path = gguf_export.convert_hf_to_gguf(src, tmp_path / "tiny.gguf")
    data = json.loads(_info(cli_app, str(path), "--json").output)
    assert data["format"] == "gguf" and data["architecture"] == "llama"
    assert data["layout"] == "GGUF TQ2_0"
    assert data["weight_bytes"] == path.stat().st_size
    assert data["ternary_params"] == 3 * 256 * 512 + 2 * 256 * 256 + 2 * 256 * 128

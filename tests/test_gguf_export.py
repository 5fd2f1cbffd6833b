"""GGUF export (`pybitnet convert`): metadata, tensors, tokenizer, llama.cpp's Q/K row order, round trips."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize
from typer.testing import CliRunner

import pybitnet
from pybitnet.cli import convert
from pybitnet.errors import ConfigError, LayoutError, UnsupportedModelError
from pybitnet.formats.gguf_export import convert_hf_to_gguf, save_gguf
from pybitnet.models import ModelConfig
from pybitnet.models.dummy import create_dummy
from pybitnet.models.presets import preset
from pybitnet.models.random_init import random_model

SMALL = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return create_dummy(preset("tiny-llama", **SMALL), tmp_path_factory.mktemp("llama"), seed=1)


@pytest.fixture(scope="module")
def bitnet_dir(tmp_path_factory) -> Path:
    return create_dummy(preset("tiny-bitnet", **SMALL), tmp_path_factory.mktemp("bitnet"), seed=2)


def field(reader: GGUFReader, key: str):
    return reader.fields[key].contents()


def tensor(reader: GGUFReader, name: str):
    return next(t for t in reader.tensors if t.name == name)


def test_llama_export_is_a_valid_gguf_with_the_required_keys(llama_dir, tmp_path):
    out = convert_hf_to_gguf(llama_dir, tmp_path / "m.gguf", "tq2_0")
    r = GGUFReader(out)  # the gguf package's own reader is the independent judge of the file
    config = json.loads((llama_dir / "config.json").read_text())
    expected = {
        "general.architecture": "llama",
        "general.quantization_version": 2,
        "llama.context_length": config["max_position_embeddings"],
        "llama.embedding_length": 256,
        "llama.block_count": config["num_hidden_layers"],
        "llama.feed_forward_length": 512,
        "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 2,
        "llama.rope.dimension_count": 64,
        "llama.rope.freq_base": config["rope_theta"],
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "llama-bpe",
        "tokenizer.ggml.bos_token_id": config["bos_token_id"],
        "tokenizer.ggml.eos_token_id": config["eos_token_id"],
    }
    for key, value in expected.items():
        assert (
            field(r, key) == pytest.approx(value) if isinstance(value, float) else field(r, key) == value
        ), key
    assert field(r, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(config["rms_norm_eps"])

    tok = json.loads((llama_dir / "tokenizer.json").read_text())
    tokens = field(r, "tokenizer.ggml.tokens")
    assert len(tokens) == config["vocab_size"]
    for text, i in list(tok["model"]["vocab"].items())[:50]:
        assert tokens[i] == text
    types = field(r, "tokenizer.ggml.token_type")
    eot = tokens.index("<|eot_id|>")
    assert field(r, "tokenizer.ggml.eot_token_id") == eot
    assert types[eot] == 3 and types[config["bos_token_id"]] == 3  # CONTROL
    assert len(field(r, "tokenizer.ggml.merges")) == len(tok["model"]["merges"])
    template = json.loads((llama_dir / "tokenizer_config.json").read_text())["chat_template"]
    assert field(r, "tokenizer.chat_template") == template

    types_by_name = {t.name: t.tensor_type for t in r.tensors}
    assert types_by_name["blk.0.attn_q.weight"] == GGMLQuantizationType.TQ2_0
    assert types_by_name["blk.1.ffn_down.weight"] == GGMLQuantizationType.TQ2_0
    assert types_by_name["blk.0.attn_norm.weight"] == GGMLQuantizationType.F32
    assert types_by_name["output_norm.weight"] == GGMLQuantizationType.F32
    assert types_by_name["token_embd.weight"] == GGMLQuantizationType.F16
    assert types_by_name["output.weight"] == GGMLQuantizationType.F16  # tiny-llama is untied
    assert "rope_freqs.weight" not in types_by_name


def interleave_reference(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's Q/K order, written out: row h*D + 2i takes row h*D + i, row h*D + 2i + 1 takes
    row h*D + D/2 + i."""
    d = w.shape[0] // n_heads
    out = np.empty_like(w)
    for h in range(n_heads):
        for i in range(d // 2):
            out[h * d + 2 * i] = w[h * d + i]
            out[h * d + 2 * i + 1] = w[h * d + d // 2 + i]
    return out


def stored_weight(reader: GGUFReader, name: str) -> np.ndarray:
    t = tensor(reader, name)
    return dequantize(np.array(t.data), t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))


def test_q_and_k_rows_follow_llama_cpp_rope_order_only_for_llama(llama_dir, bitnet_dir, tmp_path):
    for model_dir, permuted in ((llama_dir, True), (bitnet_dir, False)):
        model = pybitnet.load_model(model_dir)
        r = GGUFReader(convert_hf_to_gguf(model_dir, tmp_path / f"{model_dir.name}.gguf", "tq1_0"))
        attn = model.layers[0].self_attn
        for proj, gguf_name, heads in (
            (attn.q_proj, "attn_q", 4),
            (attn.k_proj, "attn_k", 2),
            (attn.v_proj, "attn_v", 0),
        ):
            ours = proj.ternary().dequantize().numpy()
            expected = interleave_reference(ours, heads) if permuted and heads else ours
            np.testing.assert_array_equal(stored_weight(r, f"blk.0.{gguf_name}.weight"), expected)


@pytest.mark.parametrize("weight_type", ["tq2_0", "tq1_0"])
def test_export_then_import_gives_identical_logits(llama_dir, bitnet_dir, tmp_path, weight_type):
    ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(0))
    for model_dir in (llama_dir, bitnet_dir):
        path = convert_hf_to_gguf(model_dir, tmp_path / f"{model_dir.name}.gguf", weight_type)
        expected = pybitnet.load_model(model_dir)(ids)
        got = pybitnet.load_model(path)(ids)
        if model_dir == bitnet_dir:
            assert torch.equal(got, expected)  # F16 embeddings and fp16 scales hold the bf16 dummy exactly
        else:
            # llama dummies store 1 / scale (linear_class bitlinear): inverting it back is 1 ulp off the
            # fp16-exact scale the GGUF blocks keep
            assert ((got - expected).abs().max() / expected.abs().max()).item() < 1e-6


def test_bitnet_export_uses_the_bitnet_b158_architecture_tied(bitnet_dir, tmp_path):
    r = GGUFReader(convert_hf_to_gguf(bitnet_dir, tmp_path / "b.gguf", "tq2_0", "q8_0"))
    assert field(r, "general.architecture") == "bitnet-b1.58"
    assert field(r, "bitnet-b1.58.embedding_length") == 256
    names = {t.name for t in r.tensors}
    assert "output.weight" not in names
    assert {"blk.0.attn_sub_norm.weight", "blk.0.ffn_sub_norm.weight"} <= names
    assert tensor(r, "token_embd.weight").tensor_type == GGMLQuantizationType.Q8_0


def test_q8_0_embeddings_stay_close(llama_dir, tmp_path):
    path = convert_hf_to_gguf(llama_dir, tmp_path / "q8.gguf", "tq2_0", "q8_0")
    ids = torch.arange(16).view(1, 16)
    expected = pybitnet.load_model(llama_dir, kernel="reference")(ids)
    got = pybitnet.load_model(path, kernel="reference")(ids)
    assert not torch.equal(got, expected)
    assert (got - expected).abs().max() / expected.abs().max() < 0.02


def test_llama3_rope_scaling_is_written_as_rope_freqs(llama_dir, tmp_path):
    scaling = dict(
        rope_type="llama3",
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=64,
    )
    model = random_model(preset("tiny-llama", **SMALL, rope_scaling=scaling), seed=3)
    path = save_gguf(model, tmp_path / "r.gguf", llama_dir)
    assert "rope_freqs.weight" in {t.name for t in GGUFReader(path).tensors}
    back = pybitnet.load_model(path)
    torch.testing.assert_close(back.inv_freq, model.inv_freq)
    ids = torch.arange(20).view(1, 20)
    torch.testing.assert_close(
        back(ids), model(ids), rtol=0, atol=0.05
    )  # F16 embeddings round the randn ones


def test_in_features_not_a_multiple_of_256_names_the_tensor(llama_dir, tmp_path):
    model = random_model(preset("tiny-llama"), seed=0)  # hidden 128
    with pytest.raises(
        LayoutError, match=r"blk\.0\.attn_q\.weight .*in_features 128 is not a multiple of 256"
    ):
        save_gguf(model, tmp_path / "x.gguf", llama_dir)
    assert not (tmp_path / "x.gguf").exists()


def test_unsupported_models_and_tokenizers(llama_dir, tmp_path):
    legacy = ModelConfig(**{**preset("tiny-llama", **SMALL).to_dict(), "family": "legacy"})
    with pytest.raises(UnsupportedModelError, match="legacy"):
        save_gguf(random_model(legacy), tmp_path / "l.gguf", llama_dir)
    model = random_model(preset("tiny-llama", **SMALL))
    with pytest.raises(ConfigError, match=r"no tokenizer\.json"):
        save_gguf(model, tmp_path / "t.gguf", tmp_path)
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "Unigram"}, "decoder": {}}))
    with pytest.raises(UnsupportedModelError, match="byte-level BPE"):
        save_gguf(model, tmp_path / "t.gguf", tmp_path)
    with pytest.raises(LayoutError, match="unknown GGUF weight type"):
        save_gguf(model, tmp_path / "t.gguf", llama_dir, weight_type="q4_0")


def test_cli_convert(llama_dir, tmp_path):
    app = typer.Typer()
    app.callback()(lambda: None)  # keep `convert` a subcommand, as in the real app
    convert.register(app)
    runner = CliRunner()
    out = tmp_path / "cli.gguf"
    result = runner.invoke(app, ["convert", str(llama_dir), str(out), "--type", "tq1_0"])
    assert result.exit_code == 0, result.output
    assert "tq1_0" in result.output and out.is_file()
    assert tensor(GGUFReader(out), "blk.0.attn_q.weight").tensor_type == GGMLQuantizationType.TQ1_0
    result = runner.invoke(app, ["convert", str(llama_dir), str(out), "--type", "q4_0"])
    assert result.exit_code == 2
    result = runner.invoke(app, ["convert", str(tmp_path / "missing"), str(out)])
    assert result.exit_code == 1 and "error:" in result.output

"""Presets with real shapes, the dummy tokenizer, and `create-dummy` checkpoints that both stacks load."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import pybitnet
from conftest import rel_err
from pybitnet.errors import ConfigError
from pybitnet.models.dummy import CHAT_TEMPLATE_2B4T, build_tokenizer, create_dummy, special_token_ids
from pybitnet.models.presets import PRESETS, preset
from pybitnet.models.summary import parameter_counts

# the 2B-4T vocabulary and special ids on a narrow model, so the test stays small
NARROW_2B4T = dict(
    hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=1
)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_is_a_valid_config(name):
    config = preset(name)
    ternary, floating = parameter_counts(config)
    assert ternary > 0 and floating > 0
    assert config.hidden_size % config.num_attention_heads == 0


def test_bitnet_2b_4t_has_the_hub_shape():
    c = preset("bitnet-2b-4t")
    assert (c.family, c.hidden_act, c.linear_class, c.tie_word_embeddings) == (
        "bitnet",
        "relu2",
        "autobitlinear",
        True,
    )
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (2560, 6912, 30)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (20, 5, 128)
    assert (c.vocab_size, c.max_position_embeddings, c.rope_theta, c.rms_norm_eps) == (
        128256,
        4096,
        500000.0,
        1e-5,
    )
    assert (c.bos_token_id, c.eos_token_id) == (128000, 128001)
    ternary, floating = parameter_counts(c)
    assert ternary == 30 * (2 * 2560 * 2560 + 2 * 640 * 2560 + 3 * 2560 * 6912)
    assert floating == 128256 * 2560 + 30 * (3 * 2560 + 6912) + 2560


def test_preset_overrides_and_unknown_names():
    assert preset("tiny-bitnet", num_hidden_layers=1).num_hidden_layers == 1
    with pytest.raises(ConfigError, match=r"unknown preset 'huge'; known presets: .*bitnet-2b-4t"):
        preset("huge")


def test_llama3_special_token_layout():
    specials = special_token_ids(128256, 128000, 128001)
    assert len(specials) == 256 and min(specials) == 128000
    assert specials[128000] == "<|begin_of_text|>" and specials[128001] == "<|end_of_text|>"
    assert specials[128006] == "<|start_header_id|>" and specials[128007] == "<|end_header_id|>"
    assert specials[128009] == "<|eot_id|>"
    assert (
        specials[128002] == "<|reserved_special_token_0|>"
        and specials[128255] == "<|reserved_special_token_250|>"
    )


def test_tiny_special_token_layout():
    assert special_token_ids(512, 1, 2) == {
        0: "<|reserved_special_token_0|>",
        1: "<|begin_of_text|>",
        2: "<|end_of_text|>",
        3: "<|eot_id|>",
    }
    with pytest.raises(ConfigError, match="collide"):
        special_token_ids(512, 1, 1)
    with pytest.raises(ConfigError, match="inside the vocabulary"):
        special_token_ids(512, 1, 600)


@pytest.mark.parametrize(("vocab", "bos", "eos", "eot"), [(512, 1, 2, 3), (128256, 128000, 128001, 128009)])
def test_tokenizer_is_byte_level_bpe_of_exact_size(vocab, bos, eos, eot):
    tok = build_tokenizer(vocab, bos, eos)
    assert tok.get_vocab_size() == vocab
    assert sorted(tok.get_vocab().values()) == list(range(vocab))
    text = "Hello world! The quick brown fox, naïve café, 3.14 — 你好 🙂\n\tend"
    enc = tok.encode(text)
    assert enc.ids[0] == bos and all(0 <= i < vocab for i in enc.ids)
    assert tok.decode(enc.ids, skip_special_tokens=True) == text  # byte-level: lossless
    assert len(enc.ids) < len(text.encode())  # merges learned from the embedded text compress English
    assert tok.encode("hi<|eot_id|>", add_special_tokens=False).ids[-1] == eot
    assert tok.id_to_token(eos) == "<|end_of_text|>"
    # every id decodes (random generations must detokenize)
    assert isinstance(
        tok.decode(list(range(vocab - 300, vocab)) + list(range(300)), skip_special_tokens=False), str
    )


def test_tokenizer_is_deterministic():
    assert build_tokenizer(512, 1, 2).to_str() == build_tokenizer(512, 1, 2).to_str()


@pytest.mark.parametrize("name", ["tiny-bitnet", "tiny-llama", "tiny-legacy"])
def test_dummy_files_and_transformers_tokenizer(dummy_dir, name):
    transformers = pytest.importorskip("transformers")
    path = dummy_dir(name)
    for fname in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "generation_config.json",
    ):
        assert (path / fname).is_file(), fname
    tok = transformers.AutoTokenizer.from_pretrained(path)
    assert (tok.bos_token_id, tok.eos_token_id, len(tok)) == (1, 2, 512)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hi there "}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|begin_of_text|>System: Be brief.<|eot_id|>User: Hi there<|eot_id|>Assistant: "
    assert json.loads((path / "tokenizer_config.json").read_text())["chat_template"] == CHAT_TEMPLATE_2B4T
    assert json.loads((path / "generation_config.json").read_text())["eos_token_id"] == [2, 3]


def test_2b4t_vocabulary_dummy_loads_in_pybitnet_and_transformers(tmp_path, hf_reference):
    transformers = pytest.importorskip("transformers")
    path = create_dummy(preset("bitnet-2b-4t", **NARROW_2B4T), tmp_path, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(path)
    assert (tok.bos_token_id, tok.eos_token_id, tok.convert_tokens_to_ids("<|eot_id|>")) == (
        128000,
        128001,
        128009,
    )
    ids = tok.apply_chat_template([{"role": "user", "content": "Hello"}], add_generation_prompt=True)
    ids = torch.tensor([ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids])
    assert ids[0, 0].item() == 128000 and 128009 in ids[0].tolist()
    ours = pybitnet.load_model(path, kernel="reference")(ids)
    with torch.no_grad():
        ref = hf_reference(path)(ids).logits
    assert ours.shape == (1, ids.shape[1], 128256)
    assert rel_err(ours, ref) <= 1e-4
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["quantization_config"] == {
        "quant_method": "bitnet",
        "linear_class": "autobitlinear",
        "quantization_mode": "offline",
        "use_rms_norm": False,
        "rms_norm_eps": 1e-6,
    }
    assert cfg["tie_word_embeddings"] is True and cfg["model_type"] == "bitnet"


def test_seed_makes_the_weights(tmp_path):
    config = preset("tiny-bitnet", num_hidden_layers=1)
    a = create_dummy(config, tmp_path / "a", seed=1)
    b = create_dummy(config, tmp_path / "b", seed=1)
    c = create_dummy(config, tmp_path / "c", seed=2)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()
    assert (a / "tokenizer.json").read_bytes() == (c / "tokenizer.json").read_bytes()


def test_bf16_dummy_stores_bf16_floats(dummy_dir):
    from safetensors import safe_open

    with safe_open(dummy_dir("tiny-bitnet", dtype=torch.bfloat16) / "model.safetensors", "pt") as f:
        assert f.get_slice("model.embed_tokens.weight").get_dtype() == "BF16"
        assert f.get_slice("model.layers.0.mlp.up_proj.weight").get_dtype() == "U8"


def test_cli_create_dummy(cli_app, tmp_path):
    out = tmp_path / "m"
    result = CliRunner().invoke(cli_app, ["create-dummy", "--preset", "tiny-llama", str(out), "--seed", "7"])
    assert result.exit_code == 0, result.output
    assert f"wrote tiny-llama (seed 7) to {out}" in result.output
    model = pybitnet.load_model(out, kernel="reference")
    assert model.config.family == "llama" and model.config.vocab_size == 512


def test_cli_create_dummy_rejects_unknown_preset(cli_app, tmp_path):
    result = CliRunner().invoke(cli_app, ["create-dummy", "--preset", "nope", str(tmp_path / "m")])
    assert result.exit_code == 2
    assert "unknown preset 'nope'" in result.output and "tiny-bitnet" in result.output
    assert not (tmp_path / "m").exists()


def test_default_positions_run_plain_causal_attention(monkeypatch):
    """Without a cache or positions every row runs at 0..T-1: attention takes SDPA's causal path (no mask
    tensor) and gives the logits the explicit per-row mask gives; with positions the mask is used."""
    from pybitnet.models import transformer
    from pybitnet.models.random_init import random_model

    model = random_model(preset("tiny-bitnet", num_hidden_layers=2), seed=0, kernel="reference")
    ids = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    calls = []
    sdpa = transformer.F.scaled_dot_product_attention

    def spy(*args, **kw):
        calls.append("mask" if kw.get("attn_mask") is not None else "causal" if kw.get("is_causal") else "?")
        return sdpa(*args, **kw)

    monkeypatch.setattr(transformer.F, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        plain = model(ids)
        assert calls == ["causal", "causal"]
        explicit = model(ids, positions=torch.arange(24).expand(2, -1))
        assert calls[2:] == ["mask", "mask"]
    assert rel_err(plain, explicit) < 1e-5

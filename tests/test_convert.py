"""pybitnet.convert.to_bitnet: swapping a full-precision model's linears for BitLinear, and the λ warm-up
that keeps the loss from jumping when a trained model is switched to ternary."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from pybitnet.convert import set_quant_strength, to_bitnet
from pybitnet.nn import BitLinear
from pybitnet.quant import fake_quantize_activations, fake_quantize_weight
from pybitnet.train import TextTokenizer, TokenDataset
from pybitnet.train.model import init_model, model_config
from pybitnet.train.trainer import summed_loss
from test_train_support import TINY, make_corpus, make_tokenizer


def tiny_llama():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def test_to_bitnet_swaps_the_linears_of_a_transformers_llama_but_not_the_head():
    model = tiny_llama()
    to_bitnet(model)
    names = {n for n, m in model.named_modules() if isinstance(m, BitLinear)}
    assert len(names) == 2 * 7
    assert "model.layers.0.self_attn.q_proj" in names and "model.layers.1.mlp.down_proj" in names
    assert type(model.lm_head) is nn.Linear
    assert isinstance(model.model.embed_tokens, nn.Embedding)


def test_lambda_zero_is_the_full_precision_model_and_one_is_ternary():
    model = tiny_llama()
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        fp = model(ids).logits
        converted = to_bitnet(copy.deepcopy(model), quant_strength=0.0)
        assert torch.equal(converted(ids).logits, fp)  # exact: λ = 0 adds an exact zero
        set_quant_strength(converted, 1.0)
        layer = converted.model.layers[0].self_attn.q_proj
        x = torch.randn(3, 64)
        expected = fake_quantize_activations(x) @ fake_quantize_weight(layer.weight).T
        torch.testing.assert_close(layer(x), expected)
        set_quant_strength(converted, 1.0, act=0.0)  # ternary weights, full-precision activations
        torch.testing.assert_close(layer(x), x @ fake_quantize_weight(layer.weight).T)


def test_include_exclude_and_sub_norms():
    model = to_bitnet(tiny_llama(), include=["*.mlp.*"], sub_norms=True)
    kinds = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, BitLinear)}
    assert kinds == {"gate_proj", "up_proj", "down_proj"}
    down = model.model.layers[0].mlp.down_proj
    assert down.input_norm is not None and down.input_norm.weight.shape == (96,)
    assert model.model.layers[0].mlp.up_proj.input_norm is None
    model = to_bitnet(tiny_llama(), exclude=["lm_head", "*.v_proj"])
    assert type(model.model.layers[0].self_attn.v_proj) is nn.Linear
    with pytest.raises(ValueError, match="quant strengths"):
        set_quant_strength(model, 1.5)


def test_converted_model_trains_with_gradients_on_the_latent_weights():
    model = to_bitnet(tiny_llama())
    ids = torch.randint(0, 128, (2, 12))
    model(ids, labels=ids).loss.backward()
    grad = model.model.layers[0].self_attn.q_proj.weight.grad
    assert grad is not None and grad.abs().sum() > 0


def _window_loss(model, ids, labels) -> float:
    with torch.no_grad():
        return (summed_loss(model, ids, labels) / (labels[:, 1:] != -100).sum()).item()


def _train(model, ids, labels, steps: int, lr: float, warmup: int = 0, probe=None) -> list[float]:
    """AdamW on random batches of 8 windows; with `warmup`, λ ramps 0 -> 1 over that many steps. Returns the
    probe loss (all windows, current λ) after each step."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    seen = []
    for step in range(steps):
        if warmup:
            set_quant_strength(model, min((step + 1) / warmup, 1.0))
        rows = torch.randint(0, ids.shape[0], (8,), generator=g)
        loss = summed_loss(model, ids[rows], labels[rows]) / (labels[rows][:, 1:] != -100).sum()
        loss.backward()
        opt.step()
        opt.zero_grad()
        if probe:
            seen.append(_window_loss(model, ids, labels))
    return seen


def test_lambda_warmup_keeps_the_loss_near_the_fp_loss_while_a_hard_switch_jumps(tmp_path: Path):
    torch.set_num_threads(1)
    tok = TextTokenizer.from_dir(make_tokenizer(tmp_path))
    data = TokenDataset([make_corpus(tmp_path)], tok, 32).samples
    ids, labels = data[:, 0], data[:, 1]
    fp = init_model(model_config("tiny-bitnet", TINY), quantize=False, seed=0)
    _train(fp, ids, labels, steps=150, lr=3e-3)
    fp_loss = _window_loss(fp, ids, labels)
    assert fp_loss < 1.5  # the fp model has learned the corpus

    hard = to_bitnet(copy.deepcopy(fp), quant_strength=1.0)
    hard_loss = _window_loss(hard, ids, labels)
    assert hard_loss > 1.5 * fp_loss  # switching all at once throws much of the training away

    soft = to_bitnet(copy.deepcopy(fp), quant_strength=0.0)
    during = _train(soft, ids, labels, steps=40, lr=1e-3, warmup=40, probe=True)
    assert max(during) < 1.5 * fp_loss, (fp_loss, during)
    set_quant_strength(soft, 1.0)
    assert _window_loss(soft, ids, labels) < 1.5 * fp_loss


def test_trainer_converts_a_transformers_llama_checkpoint(tmp_path: Path):
    import pybitnet
    from pybitnet.train import train
    from test_train_support import config

    transformers = pytest.importorskip("transformers")
    llama = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=512,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            bos_token_id=1,
            eos_token_id=2,
        )
    )
    src = tmp_path / "llama"
    llama.save_pretrained(src)
    tok_dir = make_tokenizer(tmp_path)
    for f in tok_dir.iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    # λ ~ 0 and lr 0 on the first step: the loss is the full-precision model's loss on that batch
    cfg = config(
        tmp_path, preset=None, init_from=str(src), tokenizer=None, max_steps=1, lr=0.0, shuffle=False
    )
    cfg.quant_warmup_steps, cfg.micro_batch_size = 100_000, 2
    first = train(cfg).losses[1]
    data = TokenDataset(cfg.train_data, TextTokenizer.from_dir(src), cfg.seq_len, shuffle=False).samples[:2]
    with torch.no_grad():
        fp_loss = summed_loss(llama, data[:, 0], data[:, 1]) / (data[:, 1, 1:] != -100).sum()
    assert first == pytest.approx(fp_loss.item(), rel=1e-3)
    # with the 2B-4T sub-norms, trained a few steps and exported: loads as a BitNet model
    cfg = config(tmp_path, preset=None, init_from=str(src), tokenizer=None, max_steps=3, export=True)
    cfg.add_sub_norms, cfg.quant_warmup_steps, cfg.out_dir = True, 2, str(tmp_path / "sub")
    result = train(cfg)
    model = pybitnet.load_model(result.exported["hf"], kernel="reference")
    assert model.config.family == "bitnet" and model.config.hidden_act == "silu"
    assert model(torch.tensor([[1, 5, 6]])).shape == (1, 3, 512)

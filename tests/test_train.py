"""The trainer end to end on a tiny model: overfitting, exact resume after SIGKILL, accumulation, freezing,
export, and errors for bad input."""

from __future__ import annotations

import json
import math
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import pybitnet
from pybitnet.errors import ConfigError
from pybitnet.train import CheckpointError, DataError, TextTokenizer, TokenDataset, train
from pybitnet.train.checkpoint import checkpoint_dirs
from pybitnet.train.model import init_model, model_config
from test_train_support import (
    ENV,
    config,
    losses,
    make_tokenizer,
    run_train,
    train_cmd,
    wait_for_steps,
    write_recipe,
)


def one_batch_corpus(root: Path, windows: int = 4, seq_len: int = 32) -> Path:
    """Text that packs into exactly `windows` training windows: every step then sees the same batch."""
    tok = TextTokenizer.from_dir(make_tokenizer(root))
    ids = tok.tokenizer.encode((Path(__file__).parent / "test_train.py").read_text()).ids
    path = root / "small.txt"
    n = windows * seq_len - 1  # + BOS + EOS = windows * seq_len + 1 tokens
    while True:
        path.write_text(tok.tokenizer.decode(ids[:n]))
        count = len(TokenDataset([path], tok, seq_len, shuffle=False))
        if count == windows:
            return path
        n += -1 if count > windows else 1


def test_tiny_ternary_model_overfits_one_batch(tmp_path):
    data = one_batch_corpus(tmp_path)
    cfg = config(tmp_path, train_data=[str(data)], max_steps=100, lr=1e-2, warmup_steps=10, weight_decay=0.0)
    cfg.schedule, cfg.loggers = "constant", []
    result = train(cfg)
    assert result.losses[1] > 5.0
    assert result.losses[100] < 0.05


def test_sigkill_then_resume_reproduces_the_uninterrupted_losses(tmp_path):
    steps = 30
    expected = train(config(tmp_path, max_steps=steps, out_dir=str(tmp_path / "straight"))).losses
    assert sorted(expected) == list(range(1, steps + 1))

    out = tmp_path / "killed"
    killed = write_recipe(
        tmp_path, "killed.yaml", max_steps=steps, out_dir=str(out), save_interval=3, keep_last=2
    )
    proc = subprocess.Popen(train_cmd(killed), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for_steps(proc, out, 8)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    kept = checkpoint_dirs(out / "checkpoints")
    assert 1 <= len(kept) <= 2
    assert int(kept[-1].name.split("-")[1]) < steps

    run_train(killed)
    resumed = losses(out)
    assert resumed == expected  # bit for bit: same floats, not merely close


def test_sigterm_checkpoints_the_step_and_resume_reproduces_the_losses(tmp_path):
    """A preempted run (SIGTERM) finishes its step, checkpoints it, exits 143 without exporting; the same
    command resumes and gives the losses of an uninterrupted run."""
    steps = 30
    expected = train(config(tmp_path, max_steps=steps, out_dir=str(tmp_path / "straight"))).losses
    out = tmp_path / "stopped"
    recipe = write_recipe(tmp_path, "stopped.yaml", max_steps=steps, out_dir=str(out), save_interval=0)
    proc = subprocess.Popen(train_cmd(recipe), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for_steps(proc, out, 8)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr.decode()
    assert b"run the same command to resume" in stdout
    kept = checkpoint_dirs(out / "checkpoints")
    stopped_at = int(kept[-1].name.split("-")[1])
    assert 8 <= stopped_at < steps and max(losses(out)) == stopped_at  # the checkpoint is the last step done
    assert not (out / "final").exists()

    run_train(recipe)
    assert losses(out) == expected


def test_gradient_accumulation_matches_a_larger_micro_batch(tmp_path):
    a = train(
        config(tmp_path, micro_batch_size=4, grad_accum_steps=1, out_dir=str(tmp_path / "a"), loggers=[])
    )
    b = train(
        config(tmp_path, micro_batch_size=2, grad_accum_steps=2, out_dir=str(tmp_path / "b"), loggers=[])
    )
    for step in a.losses:
        assert b.losses[step] == pytest.approx(a.losses[step], rel=5e-3)


def test_activation_checkpointing_trains_the_same_losses(tmp_path):
    """activation_checkpointing recomputes activations in the backward: the same losses, step for step."""
    runs = {}
    for mode in ("none", "block"):
        cfg = config(tmp_path, max_steps=6, activation_checkpointing=mode, out_dir=str(tmp_path / mode))
        cfg.loggers = []
        runs[mode] = train(cfg).losses
    assert runs["block"] == runs["none"]
    with pytest.raises(ConfigError, match="activation_checkpointing"):
        config(tmp_path, activation_checkpointing="all")


def test_validation_perplexity_is_exp_of_the_token_loss(tmp_path):
    result = train(
        config(tmp_path, val_data=config(tmp_path).train_data, eval_batches=2, max_steps=3, loggers=[])
    )
    assert result.val_ppl == pytest.approx(math.exp(result.val_loss))
    assert 4.0 < result.val_loss < 7.0  # near log(512) at the start


def test_frozen_parameters_do_not_change(tmp_path):
    cfg = config(tmp_path, freeze=["embed_tokens.*", "layers.0.*"], max_steps=3, export=True)
    train(cfg)
    master = tmp_path / "out" / "checkpoints"
    first, last = checkpoint_dirs(master)[0], checkpoint_dirs(master)[-1]
    assert first == last  # only the final checkpoint
    trained = load_file(str(last / "model.safetensors"))
    fresh = init_model(model_config(cfg.preset, cfg.model_overrides), True, cfg.seed).state_dict()
    assert torch.equal(trained["embed_tokens.weight"], fresh["embed_tokens.weight"])
    assert torch.equal(trained["layers.0.self_attn.q_proj.weight"], fresh["layers.0.self_attn.q_proj.weight"])
    assert not torch.equal(
        trained["layers.1.self_attn.q_proj.weight"], fresh["layers.1.self_attn.q_proj.weight"]
    )


def test_export_loads_in_pybitnet_with_the_trained_logits(tmp_path):
    result = train(config(tmp_path, max_steps=5, export=True, loggers=[]))
    hf, master = result.exported["hf"], result.exported["master"]
    config_json = json.loads((hf / "config.json").read_text())
    assert config_json["quantization_config"]["quant_method"] == "bitnet"
    assert (hf / "tokenizer.json").is_file()
    ids = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46]])
    packed = pybitnet.load_model(hf, kernel="reference")
    cfg = config(tmp_path)
    model = init_model(model_config(cfg.preset, cfg.model_overrides), True, 0)
    state = load_file(str(checkpoint_dirs(tmp_path / "out" / "checkpoints")[-1] / "model.safetensors"))
    model.load_state_dict(state)
    # the integer-exact inference kernel computes what the training forward (fake quantization) does; float
    # rounding may move an activation across an int8 rounding boundary, hence the tolerance
    with torch.no_grad():
        torch.testing.assert_close(packed(ids), model(ids), atol=1e-2, rtol=1e-2)
    # the master holds the trained latent weights rounded to bf16, and loads as a model
    saved = load_file(str(master / "model.safetensors"))
    q = "model.layers.1.mlp.down_proj.weight"
    assert saved[q].dtype == torch.bfloat16
    assert torch.equal(saved[q], state["layers.1.mlp.down_proj.weight"].to(torch.bfloat16))
    assert pybitnet.load_model(master, kernel="reference")(ids).shape == (1, 8, 512)


def test_export_loads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    result = train(config(tmp_path, max_steps=2, export=True, loggers=[]))
    hf = result.exported["hf"]
    theirs = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    ours = pybitnet.load_model(hf, kernel="reference")
    ids = torch.tensor([[1, 40, 41, 42, 43, 44]])
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids), atol=2e-2, rtol=2e-2)


def test_resume_refuses_a_different_global_batch(tmp_path):
    train(config(tmp_path, max_steps=2, loggers=[]))
    with pytest.raises(CheckpointError, match="global batch"):
        train(config(tmp_path, max_steps=4, micro_batch_size=2, loggers=[]))


def test_bad_inputs_give_clear_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        train(config(tmp_path, train_data=[str(tmp_path / "missing.jsonl")]))
    with pytest.raises(ConfigError, match="freeze pattern 'nope"):
        train(config(tmp_path, freeze=["nope.*"]))
    with pytest.raises(ConfigError, match="tokenizer"):
        train(config(tmp_path, tokenizer=None))
    with pytest.raises(ConfigError, match="model_overrides"):
        train(config(tmp_path, model_overrides={"hidden_sise": 64}))


def test_cli_trains_from_a_recipe_with_flag_overrides(tmp_path):
    path = write_recipe(tmp_path, max_steps=2)
    proc = run_train(path, "--max-steps", "3", "--loggers", "jsonl,csv")
    assert "trained 3 steps" in proc.stdout
    assert sorted(losses(tmp_path / "out")) == [1, 2, 3]
    assert (tmp_path / "out" / "metrics.csv").read_text().count("\n") == 4


def test_cli_rejects_unknown_keys_naming_them(tmp_path):
    path = write_recipe(tmp_path, max_step=2)
    proc = subprocess.run(train_cmd(path), env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "max_step" in proc.stderr
    path = write_recipe(tmp_path)
    proc = subprocess.run(train_cmd(path, "--warmup-stepz", "3"), env=ENV, capture_output=True, text=True)
    assert proc.returncode == 2
    assert "--warmup-stepz" in proc.stderr


def test_every_logger_writes_its_file(tmp_path):
    train(config(tmp_path, max_steps=2, loggers=["console", "csv", "jsonl", "tensorboard"]))
    out = tmp_path / "out"
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    header, *rows = (out / "metrics.csv").read_text().splitlines()
    assert header.startswith("step,loss,lr") and len(rows) == 2
    assert sorted(losses(out)) == [1, 2]


def test_train_verb_is_registered_and_lists_every_key():
    from typer.testing import CliRunner

    from pybitnet.cli.app import _register_verbs, app
    from pybitnet.train.config import field_types

    _register_verbs()
    result = CliRunner().invoke(app, ["train", "--help"])
    assert result.exit_code == 0
    for key in field_types():
        assert f"--{key.replace('_', '-')}" in result.output

"""Recipes, flags and schedules: unknown keys and bad values are errors naming the key; every key is a flag;
the learning-rate, weight-decay and λ schedules have their documented shapes."""

from __future__ import annotations

import math

import pytest

from pybitnet.errors import ConfigError
from pybitnet.train import TrainConfig, config_from_dict
from pybitnet.train.cli_args import build_config, parse_flags
from pybitnet.train.schedules import lr_at, quant_strength_at, weight_decay_at

BASE = {"preset": "tiny-bitnet", "train_data": ["a.txt"]}


def cfg(**kw) -> TrainConfig:
    return TrainConfig(**{**BASE, **kw})


def test_unknown_keys_and_bad_values_name_the_key():
    with pytest.raises(ConfigError, match="unknown key in recipe: lr_max"):
        config_from_dict({**BASE, "lr_max": 1})
    with pytest.raises(ConfigError, match="optimizer must be one of adamw, adam, sgd; got 'lion'"):
        config_from_dict({**BASE, "optimizer": "lion"})
    with pytest.raises(ConfigError, match="fused_grad_x must be one of bf16, int8; got 'fp8'"):
        config_from_dict({**BASE, "fused_grad_x": "fp8"})
    with pytest.raises(ConfigError, match="max_steps: expected int"):
        config_from_dict({**BASE, "max_steps": "many"})
    with pytest.raises(ConfigError, match="micro_batch_size must be at least 1"):
        config_from_dict({**BASE, "micro_batch_size": 0})
    with pytest.raises(ConfigError, match="exactly one of preset"):
        config_from_dict({"train_data": ["a.txt"]})
    with pytest.raises(ConfigError, match="train_data is empty"):
        config_from_dict({"preset": "tiny-bitnet"})
    with pytest.raises(ConfigError, match="min_lr"):
        config_from_dict({**BASE, "lr": 1e-4, "min_lr": 1e-3})


def test_every_key_is_a_flag_with_booleans_and_lists():
    values = parse_flags(
        [
            "--max-steps",
            "7",
            "--lr=0.01",
            "--no-packing",
            "--compile",
            "--loggers",
            "csv,jsonl",
            "--init-from",
            "m",
        ]
    )
    assert values == {
        "max_steps": 7,
        "lr": 0.01,
        "packing": False,
        "compile": True,
        "loggers": ["csv", "jsonl"],
        "init_from": "m",
    }
    assert parse_flags(["--model-overrides", '{"hidden_size": 64}']) == {
        "model_overrides": {"hidden_size": 64}
    }
    with pytest.raises(ConfigError, match="unknown option --max-step "):
        parse_flags(["--max-step", "3"])
    with pytest.raises(ConfigError, match="needs a value"):
        parse_flags(["--lr"])


def test_flags_override_the_recipe(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("preset: tiny-bitnet\ntrain_data: [a.txt]\nlr: 0.1\nmax_steps: 5\n")
    c = build_config(str(recipe), ["--lr", "0.2"])
    assert (c.lr, c.max_steps) == (0.2, 5)
    recipe.write_text("preset: tiny-bitnet\ntrain_data: [a.txt]\nwarmup: 3\n")
    with pytest.raises(ConfigError, match="warmup"):
        build_config(str(recipe), [])
    recipe.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        build_config(str(recipe), [])
    with pytest.raises(ConfigError, match="does not exist"):
        build_config(str(tmp_path / "missing.yaml"), [])


@pytest.mark.parametrize("schedule", ["constant", "cosine", "linear", "exponential", "wsd", "two_stage"])
def test_schedules_warm_up_linearly_then_stay_within_bounds(schedule):
    c = cfg(schedule=schedule, lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    assert [lr_at(s, c) for s in range(3)] == pytest.approx([0.1, 0.2, 0.3])
    assert lr_at(9, c) == pytest.approx(1.0)
    values = [lr_at(s, c) for s in range(10, 110)]
    assert all(0.1 - 1e-9 <= v <= 1.0 + 1e-9 for v in values)


def test_schedule_shapes():
    cos = cfg(schedule="cosine", lr=1.0, min_lr=0.0, max_steps=100)
    assert lr_at(50, cos) == pytest.approx(0.5)
    assert lr_at(100, cos) == pytest.approx(0.0)
    lin = cfg(schedule="linear", lr=1.0, max_steps=100)
    assert lr_at(25, lin) == pytest.approx(0.75)
    exp = cfg(schedule="exponential", lr=1.0, exp_gamma=0.9, max_steps=100)
    assert lr_at(2, exp) == pytest.approx(0.81)
    wsd = cfg(schedule="wsd", lr=1.0, decay_fraction=0.2, max_steps=100)
    assert lr_at(79, wsd) == 1.0 and lr_at(90, wsd) == pytest.approx(0.5)


def test_two_stage_lr_drops_and_weight_decay_turns_off():
    c = cfg(schedule="two_stage", lr=1.0, min_lr=0.0, stage_split=0.5, stage2_lr_ratio=0.4, max_steps=100)
    assert lr_at(0, c) == 1.0
    assert lr_at(49, c) > 0.8 > lr_at(50, c) == pytest.approx(0.4)  # the abrupt drop between the stages
    assert lr_at(99, c) < 0.01
    assert weight_decay_at(0, c) == pytest.approx(0.1)
    assert weight_decay_at(25, c) == pytest.approx(0.05)
    assert weight_decay_at(50, c) == 0.0 and weight_decay_at(99, c) == 0.0
    assert weight_decay_at(70, cfg(schedule="cosine")) == 0.1


def test_quant_strength_ramps_to_one():
    assert [quant_strength_at(s, 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert quant_strength_at(0, 0) == 1.0
    assert math.isclose(quant_strength_at(9, 100), 0.1)


def test_example_recipes_are_valid():
    from pathlib import Path

    from pybitnet.train import read_recipe

    recipes = sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml"))
    assert len(recipes) >= 4
    for path in recipes:
        config_from_dict(read_recipe(path), str(path))

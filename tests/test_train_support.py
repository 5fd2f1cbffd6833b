"""Shared pieces of the training tests: a tokenizer directory, a small corpus, tiny recipes, subprocess runs.

Holds no tests itself. Everything runs on one CPU thread: the machines are small and shared, and one thread
also makes runs bit-for-bit repeatable.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from pybitnet.models.dummy import TRAINING_TEXT, tokenizer_for, write_tokenizer_files
from pybitnet.models.presets import preset
from pybitnet.train import TrainConfig

TINY = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}

torch.set_num_threads(1)


def make_tokenizer(root: Path) -> Path:
    out = root / "tok"
    out.mkdir(parents=True, exist_ok=True)
    config = preset("tiny-bitnet")
    write_tokenizer_files(tokenizer_for(config), config, out)
    return out


def make_corpus(root: Path) -> Path:
    path = root / "corpus.txt"
    path.write_text(TRAINING_TEXT)
    return path


def recipe(root: Path, **overrides: Any) -> dict[str, Any]:
    """A tiny, fast recipe (fp32, a 2-layer 64-wide model, 32-token windows) as a dict of recipe keys."""
    values: dict[str, Any] = {
        "preset": "tiny-bitnet",
        "model_overrides": TINY,
        "tokenizer": str(make_tokenizer(root)),
        "train_data": [str(make_corpus(root))],
        "seq_len": 32,
        "micro_batch_size": 4,
        "max_steps": 10,
        "lr": 3e-3,
        "precision": "fp32",
        "loggers": ["jsonl"],
        "log_interval": 1,
        "export": False,
        "out_dir": str(root / "out"),
    }
    values.update(overrides)
    return values


def config(root: Path, **overrides: Any) -> TrainConfig:
    return TrainConfig(**recipe(root, **overrides))


def write_recipe(root: Path, name: str = "recipe.yaml", **overrides: Any) -> Path:
    path = root / name
    path.write_text(json.dumps(recipe(root, **overrides)))  # JSON is YAML
    return path


def train_cmd(recipe_path: Path, *flags: str, nproc: int = 1) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "pybitnet.train", "--config", str(recipe_path), *flags]
    torchrun = Path(sys.executable).with_name("torchrun")
    return [str(torchrun), "--standalone", f"--nproc-per-node={nproc}", "-m", "pybitnet.train",
            "--config", str(recipe_path), *flags]  # fmt: skip


def run_train(
    recipe_path: Path, *flags: str, nproc: int = 1, timeout: float = 240
) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        train_cmd(recipe_path, *flags, nproc=nproc), env=ENV, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def losses(out_dir: Path) -> dict[int, float]:
    """step -> training loss from metrics.jsonl (the last row of a step wins)."""
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def wait_for_steps(proc: subprocess.Popen, out: Path, steps: int) -> None:
    """Until the run has logged `steps` steps; it must still be running then, to be interrupted."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        done = (out / "metrics.jsonl").read_text().count("\n") if (out / "metrics.jsonl").exists() else 0
        if done >= steps:
            break
        time.sleep(0.005)
    assert proc.poll() is None, "the run finished before it could be interrupted"

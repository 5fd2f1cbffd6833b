"""Data parallelism on CPU (gloo): 2 processes give the losses of 1 process at the same global batch.

Tolerances: the two runs sum gradients in different orders, so losses may differ by float rounding, which the
ternary rounding of weights can amplify (a 1-ulp change can flip a weight between two codes). DDP: relative
5e-3 (in practice equal); FSDP2 (sharded clipping norm and optimizer): relative 1e-2.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

import pytest
import torch.distributed as dist

from pybitnet.train import train
from pybitnet.train.checkpoint import checkpoint_dirs
from test_train_support import ENV, config, losses, run_train, train_cmd, wait_for_steps, write_recipe

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


@pytest.mark.parametrize(("mode", "rel"), [("ddp", 5e-3), ("fsdp", 1e-2)])
def test_two_processes_match_one_at_the_same_global_batch(tmp_path, mode, rel):
    steps = 6
    single = train(
        config(tmp_path, max_steps=steps, micro_batch_size=2, grad_accum_steps=2, loggers=[])
    ).losses
    path = write_recipe(tmp_path, max_steps=steps, micro_batch_size=2, out_dir=str(tmp_path / mode))
    run_train(path, "--distributed", mode, nproc=2)
    double = losses(tmp_path / mode)
    assert sorted(double) == list(range(1, steps + 1))
    for step, loss in single.items():
        assert double[step] == pytest.approx(loss, rel=rel), step


def _children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (torchrun's workers), from /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds torchrun's workers in /proc")
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_sigterm_to_one_process_stops_every_process_after_the_same_step(tmp_path, mode):
    """A signal that reaches one of two processes stops both after the same step (they agree where they
    synchronize), with one checkpoint of that step and no export; the same command then resumes (every rank
    loads the checkpoint) and gives the losses of an uninterrupted two-process run, exactly."""
    steps = 24
    run_train(write_recipe(tmp_path, "straight.yaml", max_steps=steps, out_dir=str(tmp_path / "straight")),
              "--distributed", mode, nproc=2)  # fmt: skip
    expected = losses(tmp_path / "straight")
    out = tmp_path / "stopped"
    recipe = write_recipe(tmp_path, "stopped.yaml", max_steps=steps, out_dir=str(out), save_interval=0)
    cmd = train_cmd(recipe, "--distributed", mode, nproc=2)
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for_steps(proc, out, 6)
    workers = _children(proc.pid)
    assert len(workers) == 2, workers
    os.kill(workers[-1], signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    # the workers leave with 128 + SIGTERM; the agent, seeing the first one go, may signal a second that is
    # already past its checkpoint (-15: ended by that signal)
    codes = set(re.findall(r"exitcode\s*:\s*(-?\d+)", stderr.decode()))
    assert proc.returncode != 0 and "143" in codes and codes <= {"143", "-15"}, stderr.decode()[-3000:]
    kept = checkpoint_dirs(out / "checkpoints")
    stopped_at = int(kept[-1].name.split("-")[1])
    assert 6 <= stopped_at < steps and max(losses(out)) == stopped_at
    assert not (out / "final").exists()
    run_train(recipe, "--distributed", mode, nproc=2)
    assert losses(out) == expected

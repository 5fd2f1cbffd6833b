"""Data parallelism on CPU (gloo): 2 processes give the losses of 1 process at the same global batch.

Tolerances: the two runs sum gradients in different orders, so losses may differ by float rounding, which the
ternary rounding of weights can amplify (a 1-ulp change can flip a weight between two codes). DDP: relative
5e-3 (in practice equal); FSDP2 (sharded clipping norm and optimizer): relative 1e-2.
"""

from __future__ import annotations

import pytest
import torch.distributed as dist

from pybitnet.train import train
from test_train_support import config, losses, run_train, write_recipe

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

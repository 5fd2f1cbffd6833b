"""Data parallelism under torchrun: DDP (a model replica per process) or FSDP2 (parameters sharded).

Run `torchrun --nproc-per-node N -m pybitnet.cli.app train ...` (or `pybitnet train` through torchrun): the
process group comes from torchrun's environment, NCCL on GPUs and gloo on CPUs.
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..errors import ConfigError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    mode: str = "none"  # none | ddp | fsdp

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(mode: str, device_type: str) -> DistInfo:
    """Join torchrun's process group when launched by it; `mode` auto picks DDP for more than one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        if mode in ("ddp", "fsdp"):
            raise ConfigError(
                f"distributed: {mode} needs torchrun with more than one process (WORLD_SIZE is 1)"
            )
        return DistInfo()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return DistInfo(rank, world, local_rank, "ddp" if mode in ("auto", "none") else mode)


def wrap(model: nn.Module, info: DistInfo, device: torch.device) -> nn.Module:
    """The model ready for data-parallel training: DDP, or FSDP2 with each transformer block its own shard."""
    if info.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    if info.mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in transformer_blocks(model):
            fully_shard(block)
        return fully_shard(model)
    return model


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """Decoder blocks of a pybitnet Transformer (model.layers) or a transformers LM (model.model.layers)."""
    layers = getattr(model, "layers", None)
    if layers is None:
        layers = getattr(getattr(model, "model", None), "layers", None)
    return list(layers) if layers is not None else []


def no_grad_sync(model: nn.Module, info: DistInfo, last_micro_step: bool) -> AbstractContextManager:
    """Skip the gradient all-reduce on every accumulation micro-step but the last."""
    if info.mode == "ddp" and not last_micro_step:
        return model.no_sync()
    if info.mode == "fsdp":
        model.set_requires_gradient_sync(last_micro_step)
    return nullcontext()


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.world_size > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier(info: DistInfo) -> None:
    if info.world_size > 1:
        dist.barrier()


def teardown(info: DistInfo) -> None:
    if info.world_size > 1 and dist.is_initialized():
        # every rank's collectives have completed before the groups go: gloo work still in flight at
        # interpreter exit can abort the process after a finished run
        dist.barrier()
        dist.destroy_process_group()

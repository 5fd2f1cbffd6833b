"""Training checkpoints: everything a resumed run needs to continue bit for bit, and no pickle.

A checkpoint is a directory `step-00000100/` holding
  model.safetensors       the full model state (float32 masters)
  optimizer.safetensors   the optimizer's tensors, named "<param>/<key>"
  rng.safetensors         torch CPU (and CUDA) generator states
  trainer_state.json      step, tokens, data position, optimizer hyper-parameters, Python RNG state, config
It is written under a temporary name, fsynced, then renamed: a run killed mid-save leaves the previous
checkpoint intact and never a half-written one under a valid name. Only the newest `keep_last` are kept.
Works the same for one process, DDP and FSDP2 (full state dicts gathered to, and written by, rank 0).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from .errors import CheckpointError

CHECKPOINT_RE = re.compile(r"^step-(\d{8})$")
STATE_FILE = "trainer_state.json"
FORMAT_VERSION = 1


def checkpoint_dirs(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if CHECKPOINT_RE.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(root: Path) -> Path | None:
    dirs = checkpoint_dirs(root)
    return dirs[-1] if dirs else None


def _full_options(**kw) -> StateDictOptions:
    return StateDictOptions(full_state_dict=True, cpu_offload=True, **kw)


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory (tied embeddings): store each one on its own."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, data: Any) -> None:
    with path.open("w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file(_unshared(tensors), str(path))
    with path.open("rb") as f:
        os.fsync(f.fileno())


def rng_state() -> tuple[dict[str, torch.Tensor], Any]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    return tensors, _jsonable(random.getstate())


def set_rng_state(tensors: dict[str, torch.Tensor], python_state: Any) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    random.setstate(_tuples(python_state))


def _jsonable(x: Any) -> Any:
    return [_jsonable(v) for v in x] if isinstance(x, (tuple, list)) else x


def _tuples(x: Any) -> Any:
    return tuple(_tuples(v) for v in x) if isinstance(x, list) else x


def _split_optimizer_state(osd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Full optimizer state dict -> (tensors "<param>/<key>", JSON part: param groups and scalar states)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for param, state in osd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{param}/{key}"] = value
            elif value is not None:
                scalars.setdefault(param, {})[key] = value
    groups = [{k: _jsonable(v) for k, v in g.items()} for g in osd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def _join_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[str, dict[str, Any]] = {}
    for name, t in tensors.items():
        param, _, key = name.rpartition("/")
        state.setdefault(param, {})[key] = t
    for param, values in meta["scalars"].items():
        state.setdefault(param, {}).update(values)
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    return {"state": state, "param_groups": groups}


def save_checkpoint(
    root: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    keep_last: int,
    is_main: bool = True,
) -> Path | None:
    """Write checkpoint `step` atomically under `root` and prune old ones. Every rank must call this (the
    full state dicts are collectives under FSDP); only the main rank writes."""
    model_sd = get_model_state_dict(model, options=_full_options())
    optim_sd = get_optimizer_state_dict(model, optimizer, options=_full_options())
    if not is_main:
        return None
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    optim_tensors, optim_meta = _split_optimizer_state(optim_sd)
    rng_tensors, py_rng = rng_state()
    _save_tensors(model_sd, tmp / "model.safetensors")
    _save_tensors(optim_tensors, tmp / "optimizer.safetensors")
    _save_tensors(rng_tensors, tmp / "rng.safetensors")
    state = {"format_version": FORMAT_VERSION, **trainer_state, "optimizer": optim_meta, "python_rng": py_rng}
    _write_json(tmp / STATE_FILE, state)
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    for old in checkpoint_dirs(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} is missing; the checkpoint is incomplete")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from None


def read_trainer_state(ckpt: Path) -> dict[str, Any]:
    try:
        state = json.loads((ckpt / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {ckpt / STATE_FILE}: {e}") from None
    if state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{ckpt} has checkpoint format {state.get('format_version')}, not {FORMAT_VERSION}"
        )
    return state


def load_checkpoint(ckpt: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore model, optimizer and RNG states from `ckpt`; return the trainer state (step, data position)."""
    state = read_trainer_state(ckpt)
    model_sd = _load_tensors(ckpt / "model.safetensors")
    # the names only: a sharded state dict has the full one's names on every rank, and gathers nothing (the
    # full one with cpu_offload is empty on every rank but the first)
    expected = set(get_model_state_dict(model, options=StateDictOptions(full_state_dict=False)))
    if set(model_sd) != expected:
        missing, extra = sorted(expected - set(model_sd)), sorted(set(model_sd) - expected)
        raise CheckpointError(
            f"{ckpt} does not match the model: missing {missing[:5]}, unexpected {extra[:5]}; "
            "resume with the recipe the checkpoint was trained with"
        )
    try:
        set_model_state_dict(model, model_sd, options=StateDictOptions(full_state_dict=True))
        osd = _join_optimizer_state(_load_tensors(ckpt / "optimizer.safetensors"), state["optimizer"])
        set_optimizer_state_dict(model, optimizer, osd, options=StateDictOptions(full_state_dict=True))
    except (RuntimeError, KeyError, ValueError) as e:
        raise CheckpointError(f"{ckpt} does not fit this model/optimizer: {e}") from None
    set_rng_state(_load_tensors(ckpt / "rng.safetensors"), state["python_rng"])
    return state

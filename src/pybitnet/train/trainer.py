"""The training loop, top to bottom: set up, build the model and data, optionally resume, then for each
optimizer step set the schedules, accumulate gradients over micro-batches, clip, step, log, evaluate and save.

Loss normalization: each optimizer step's loss is the mean over all target tokens of the global batch
(micro_batch_size x grad_accum_steps x processes). Every micro-batch's summed loss is divided by that one
global count, so how a batch is split over micro-steps and processes does not change the result.
"""

from __future__ import annotations

import copy
import gc
import math
import random
import signal
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..convert import set_quant_strength
from ..errors import ConfigError
from ..models.transformer import rope_inv_freq, set_activation_checkpointing
from . import distributed
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .data import TokenDataset
from .errors import CheckpointError
from .fused import set_fused, use_fused_kernels
from .model import export, init_model, load_model_for_training, model_config
from .monitor import Monitor
from .schedules import lr_at, quant_strength_at, weight_decay_at
from .tokenize import IGNORE_INDEX, TextTokenizer


@dataclass
class TrainResult:
    out_dir: Path
    steps: int
    losses: dict[int, float] = field(
        default_factory=dict
    )  # step -> training loss, for the steps this run did
    val_loss: float | None = None
    val_ppl: float | None = None
    exported: dict[str, Path] = field(default_factory=dict)
    stopped_by: int | None = None  # the signal (SIGTERM, SIGINT) that stopped the run early, if one did


class StopRequest:
    """SIGTERM / SIGINT while training: finish the step, checkpoint, return (a scheduler's preemption or a
    Ctrl-C loses no work). Handlers are installed only from the main thread and restored on exit."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def requested_now(self, info: distributed.DistInfo, device: torch.device, sync_point: bool) -> bool:
        """Whether to stop after this step. One process: whenever a signal came. Several: only at sync points,
        and then if any of them got one, so that every process leaves after the same step."""
        if info.world_size == 1:
            return self.signum is not None
        if not sync_point:
            return False
        flag = torch.tensor([float(self.signum or 0)], device=device)
        stop = bool(distributed.all_reduce_sum(flag, info).item())
        if stop and self.signum is None:
            self.signum = signal.SIGTERM  # another process's signal
        return stop


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda was requested but no CUDA device is available")
    return device


def build_model(cfg: TrainConfig) -> tuple[nn.Module, Path | None]:
    """(the model to train, the directory whose tokenizer it uses by default)."""
    if cfg.preset is not None:
        return init_model(model_config(cfg.preset, cfg.model_overrides), cfg.quantize, cfg.seed), None
    path = Path(cfg.init_from)
    if not path.is_dir():
        raise ConfigError(f"init_from: {path} is not a directory holding a checkpoint")
    return load_model_for_training(path, cfg.quantize, cfg.add_sub_norms, cfg.convert_exclude), path


def freeze(model: nn.Module, patterns: list[str]) -> None:
    """requires_grad=False for parameters whose names match any fnmatch pattern; a pattern that matches
    nothing is an error (a typo would otherwise train everything)."""
    names = [name for name, _ in model.named_parameters()]
    for pattern in patterns:
        if not any(fnmatchcase(n, pattern) for n in names):
            raise ConfigError(f"freeze pattern {pattern!r} matches no parameter (e.g. {names[0]!r})")
    for name, p in model.named_parameters():
        if any(fnmatchcase(name, pat) for pat in patterns):
            p.requires_grad_(False)


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """Weight decay on matrices (linears, embeddings) only, not on norms and biases (as nanoGPT)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("freeze leaves no parameter to train")
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay, "decay": True},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0, "decay": False},
    ]
    groups = [g for g in groups if g["params"]]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    kind = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    fused = {"fused": True} if device.type == "cuda" else {}
    return kind(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, **fused)


def set_hyperparameters(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
        if group.get("decay"):
            group["weight_decay"] = weight_decay


def logits_of(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids)
    return out if isinstance(out, torch.Tensor) else out.logits


def summed_loss(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over the trained positions of a batch of windows [B, T + 1]."""
    logits = logits_of(model, ids[:, :-1])
    targets = labels[:, 1:]
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def rank_rows(n: int, info: distributed.DistInfo) -> slice:
    per_rank = n // info.world_size
    return slice(info.rank * per_rank, (info.rank + 1) * per_rank)


@torch.no_grad()
def evaluate(
    model: nn.Module, data: TokenDataset, cfg: TrainConfig, info: distributed.DistInfo, device: torch.device
) -> tuple[float, float]:
    """(mean loss per target token, perplexity) over the validation data. Each process takes every
    world_size-th row of each batch; one with no row runs a zero-weight row, so FSDP's collectives pair up."""
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for batch_ids, batch_labels in data.iter_batches(
        cfg.micro_batch_size * info.world_size, cfg.eval_batches
    ):
        ids, labels = batch_ids[info.rank :: info.world_size], batch_labels[info.rank :: info.world_size]
        weight = 1.0
        if ids.shape[0] == 0:  # fewer rows than processes
            ids, labels, weight = batch_ids[:1], batch_labels[:1], 0.0
        ids, labels = ids.to(device), labels.to(device)
        with autocast(cfg, device):
            total[0] += summed_loss(model, ids, labels).double() * weight
        total[1] += (labels[:, 1:] != IGNORE_INDEX).sum() * weight
    distributed.all_reduce_sum(total, info)
    model.train(was_training)
    loss = (total[0] / total[1].clamp(min=1)).item()
    return loss, math.exp(min(loss, 50.0))


def autocast(cfg: TrainConfig, device: torch.device):
    if cfg.precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def _check_resumable(saved: dict[str, Any], cfg: TrainConfig, global_batch: int) -> None:
    old = saved.get("config", {})
    for key in ("preset", "model_overrides", "init_from", "seq_len", "quantize", "packing"):
        if old.get(key) != getattr(cfg, key):
            raise CheckpointError(
                f"the checkpoint was trained with {key}={old.get(key)!r}, this run has "
                f"{getattr(cfg, key)!r}; "
                "use another out_dir, or set resume: false to start over"
            )
    if saved.get("global_batch") != global_batch:
        raise CheckpointError(
            f"the checkpoint's global batch was {saved.get('global_batch')} samples, this run's is "
            f"{global_batch}"
            " (micro_batch_size x grad_accum_steps x processes); keep it to resume exactly"
        )


def train(cfg: TrainConfig) -> TrainResult:
    device = pick_device(cfg.device)
    info = distributed.setup(cfg.distributed, device.type)
    result = _train(cfg, info, device)
    # the run's model, optimizer and FSDP state are freed before the process groups go: left to interpreter
    # exit, gloo work they still reference can abort a process whose run has finished
    gc.collect()
    distributed.teardown(info)
    return result


def _train(cfg: TrainConfig, info: distributed.DistInfo, device: torch.device) -> TrainResult:
    # ---- devices, seeds
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
    out_dir = Path(cfg.out_dir)
    ckpt_root = out_dir / "checkpoints"
    global_batch = cfg.micro_batch_size * cfg.grad_accum_steps * info.world_size

    # ---- model
    model, source_dir = build_model(cfg)
    freeze(model, cfg.freeze)
    set_activation_checkpointing(model, cfg.activation_checkpointing)
    model.to(device)
    fused = cfg.quantize and cfg.fused_kernels and device.type == "cuda"
    fused = fused and use_fused_kernels(model, cfg.fused_grad_x) > 0
    skeleton = copy.deepcopy(model).to("meta") if info.mode == "fsdp" else None
    raw_model = model
    model = distributed.wrap(model, info, device)
    if info.mode == "ddp":
        model.broadcast_buffers = False  # λ buffers are set identically on every rank by the schedule
    if cfg.compile:
        model.compile()

    # ---- data
    tokenizer_dir = Path(cfg.tokenizer) if cfg.tokenizer else source_dir
    if tokenizer_dir is None:
        raise ConfigError("tokenizer: set it to a directory with tokenizer.json (a preset has no tokenizer)")
    tok = TextTokenizer.from_dir(tokenizer_dir)
    data_kw = dict(
        fmt=cfg.data_format,
        text_field=cfg.text_field,
        packing=cfg.packing,
        streaming=cfg.streaming,
        on_bad_record=cfg.on_bad_record,
    )
    train_data = TokenDataset(cfg.train_data, tok, cfg.seq_len, shuffle=cfg.shuffle, seed=cfg.seed, **data_kw)
    val_data = (
        TokenDataset(cfg.val_data, tok, cfg.seq_len, shuffle=False, **data_kw) if cfg.val_data else None
    )

    # ---- optimizer, and the state of an interrupted run
    optimizer = build_optimizer(model, cfg, device)
    start_step, tokens = 0, 0
    ckpt = latest_checkpoint(ckpt_root) if cfg.resume else None
    if ckpt is not None:
        saved = load_checkpoint(ckpt, model, optimizer)
        _check_resumable(saved, cfg, global_batch)
        start_step, tokens = int(saved["step"]), int(saved["tokens"])
        train_data.load_state_dict(saved["data"])
    monitor = Monitor(out_dir, cfg.loggers, cfg.max_steps, start_step, info.is_main)
    if ckpt is not None:
        monitor.print(f"resumed from {ckpt} at step {start_step}")

    # ---- the loop
    result = TrainResult(out_dir, start_step)
    # rows whose loss is still on the device, fetched together each log_interval (one sync, not one a step)
    pending: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    model.train()
    with StopRequest() as stop:
        for step in range(start_step, cfg.max_steps):
            lr, wd = lr_at(step, cfg), weight_decay_at(step, cfg)
            set_hyperparameters(optimizer, lr, wd)
            lam_w = quant_strength_at(step, cfg.quant_warmup_steps)
            lam_a = quant_strength_at(step, cfg.act_warmup)
            set_quant_strength(raw_model, lam_w, lam_a)
            if fused:
                set_fused(raw_model, lam_w == 1.0 and lam_a == 1.0)

            ids, labels = train_data.next_batch(global_batch)
            # known on the host: no sync
            n_targets = (labels[:, 1:] != IGNORE_INDEX).sum().clamp(min=1).item()
            mine = rank_rows(global_batch, info)
            ids, labels = ids[mine].to(device), labels[mine].to(device)
            loss_sum = torch.zeros((), device=device)
            for micro in range(cfg.grad_accum_steps):
                rows = slice(micro * cfg.micro_batch_size, (micro + 1) * cfg.micro_batch_size)
                last = micro == cfg.grad_accum_steps - 1
                with distributed.no_grad_sync(model, info, last), autocast(cfg, device):
                    loss = summed_loss(model, ids[rows], labels[rows])
                    # DDP/FSDP average gradients over processes; undo that so the global token mean is exact
                    (loss * (info.world_size / n_targets)).backward()
                loss_sum += loss.detach()
            grad_norm = None
            if cfg.grad_clip > 0:
                trained = [p for p in model.parameters() if p.requires_grad]
                grad_norm = torch.nn.utils.clip_grad_norm_(trained, cfg.grad_clip)
                if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
                    grad_norm = grad_norm.full_tensor()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            tokens += global_batch * cfg.seq_len

            row = {"step": step + 1, "loss": distributed.all_reduce_sum(loss_sum, info) / n_targets, "lr": lr}
            row.update(weight_decay=wd, grad_norm=grad_norm, lambda_w=lam_w, lambda_a=lam_a, tokens=tokens)
            pending.append(row)
            last_step = step + 1 == cfg.max_steps
            evaluating = val_data is not None and (
                last_step or (cfg.eval_interval and (step + 1) % cfg.eval_interval == 0)
            )
            # a stop request is met at once in one process; with several, at the next log step (where they
            # synchronize anyway), so that all of them leave after the same step
            stopping = not last_step and stop.requested_now(info, device, (step + 1) % cfg.log_interval == 0)
            saving = last_step or stopping or (cfg.save_interval and (step + 1) % cfg.save_interval == 0)
            if (step + 1) % cfg.log_interval == 0 or evaluating or saving:
                _flush(pending, monitor, result, time.perf_counter() - t0)
            if evaluating:
                # DDP's forward would broadcast buffers; FSDP's must run on every rank (its collectives)
                eval_model = model if info.mode == "fsdp" else raw_model
                val_loss, val_ppl = evaluate(eval_model, val_data, cfg, info, device)
                result.val_loss, result.val_ppl = val_loss, val_ppl
                monitor.log({"step": step + 1, "val_loss": val_loss, "val_ppl": val_ppl}, console=True)
            if saving:
                state = {"step": step + 1, "tokens": tokens, "data": train_data.state_dict()}
                state.update(global_batch=global_batch, config=cfg.to_dict())
                save_checkpoint(ckpt_root, step + 1, model, optimizer, state, cfg.keep_last, info.is_main)
                distributed.barrier(info)
            result.steps = step + 1
            if stopping:
                result.stopped_by = stop.signum
                monitor.print(f"stopped by signal {stop.signum} after step {step + 1}; checkpoint saved")
                break
    _flush(pending, monitor, result, time.perf_counter() - t0)

    # ---- export
    if cfg.export and result.steps == cfg.max_steps:
        final = _full_model(model, raw_model, skeleton, info)
        if info.is_main:
            result.exported = export(final, out_dir / "final", tokenizer_dir, cfg.quantize)
            monitor.print(f"exported {', '.join(str(p) for p in result.exported.values())}")
        distributed.barrier(info)
    monitor.close()
    return result


def _flush(pending: list[dict[str, Any]], monitor: Monitor, result: TrainResult, elapsed: float) -> None:
    """Fetch the pending rows' device values in one transfer and log them."""
    if not pending:
        return
    values = [r["loss"] for r in pending] + [r["grad_norm"] for r in pending if r["grad_norm"] is not None]
    fetched = iter(torch.stack([torch.as_tensor(v, dtype=torch.float32).to("cpu") for v in values]).tolist())
    losses = [next(fetched) for _ in pending]
    for row, loss in zip(pending, losses, strict=True):
        row["loss"] = loss
        if row["grad_norm"] is not None:
            row["grad_norm"] = next(fetched)
        row["elapsed_s"] = round(elapsed, 3)
        result.losses[row["step"]] = loss
        monitor.log(row, console=row is pending[-1])
    pending.clear()


def _full_model(model: nn.Module, raw_model: nn.Module, skeleton: nn.Module | None, info) -> nn.Module:
    """The trained model as one unsharded module on the main process (gathered from the FSDP shards)."""
    if skeleton is None:
        return raw_model
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not info.is_main:
        return skeleton
    skeleton.to_empty(device="cpu")
    skeleton.load_state_dict(full)
    skeleton.register_buffer("inv_freq", rope_inv_freq(skeleton.config), persistent=False)
    if skeleton.config.tie_word_embeddings:
        skeleton.lm_head.weight = skeleton.embed_tokens.weight
    set_quant_strength(skeleton, 1.0)
    return skeleton

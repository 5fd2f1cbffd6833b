"""Learning-rate, weight-decay and quantization-strength (λ) schedules as pure functions of the step.

Pure functions of the step number need no state of their own: resuming at step n gives the exact values an
uninterrupted run had. `step` counts optimizer steps from 0.
"""

from __future__ import annotations

import math

from .config import TrainConfig


def _cosine(frac: float) -> float:
    """1 -> 0 along half a cosine as frac goes 0 -> 1."""
    return 0.5 * (1.0 + math.cos(math.pi * min(max(frac, 0.0), 1.0)))


def lr_at(step: int, cfg: TrainConfig) -> float:
    """The learning rate for optimizer step `step` under cfg.schedule, with linear warm-up from 0."""
    lr, lo, warm, total = cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.max_steps
    if step < warm:
        return lr * (step + 1) / warm
    span = max(total - warm, 1)
    frac = (step - warm) / span
    if cfg.schedule == "constant":
        return lr
    if cfg.schedule == "cosine":
        return lo + (lr - lo) * _cosine(frac)
    if cfg.schedule == "linear":
        return lo + (lr - lo) * max(1.0 - frac, 0.0)
    if cfg.schedule == "exponential":
        return max(lr * cfg.exp_gamma ** (step - warm), lo)
    if cfg.schedule == "wsd":  # warm-up, stable, then a linear decay over the last decay_fraction of steps
        decay_start = 1.0 - cfg.decay_fraction
        if frac < decay_start:
            return lr
        return lo + (lr - lo) * max(1.0 - (frac - decay_start) / cfg.decay_fraction, 0.0)
    return _two_stage_lr(frac, cfg)


def _two_stage_lr(frac: float, cfg: TrainConfig) -> float:
    """BitNet b1.58's two-stage schedule: a high-lr cosine stage, then an abrupt drop to a lower lr that is
    annealed to min_lr (ternary weights tolerate, and need, a large lr early and a cool-down late)."""
    split, lo = cfg.stage_split, cfg.min_lr
    stage2_lr = cfg.lr * cfg.stage2_lr_ratio
    if frac < split:
        stage1_end = min(cfg.lr * 2 * cfg.stage2_lr_ratio, cfg.lr)  # stage 1 ends above where stage 2 starts
        return stage1_end + (cfg.lr - stage1_end) * _cosine(frac / split)
    return lo + (stage2_lr - lo) * _cosine((frac - split) / (1.0 - split) if split < 1 else 1.0)


def weight_decay_at(step: int, cfg: TrainConfig) -> float:
    """Constant weight decay, except under two_stage: a cosine from cfg.weight_decay to 0 over stage 1, and
    none in stage 2 (the BitNet b1.58 recipe)."""
    if cfg.schedule != "two_stage":
        return cfg.weight_decay
    frac = max(step - cfg.warmup_steps, 0) / max(cfg.max_steps - cfg.warmup_steps, 1)
    if frac >= cfg.stage_split:
        return 0.0
    return cfg.weight_decay * _cosine(frac / cfg.stage_split)


def quant_strength_at(step: int, warmup_steps: int) -> float:
    """λ for gradual quantization: 0 -> 1 linearly over `warmup_steps` optimizer steps, then 1."""
    if warmup_steps <= 0:
        return 1.0
    return min((step + 1) / warmup_steps, 1.0)

"""Learning-rate schedules: warmup + cosine, warmup-stable-decay (WSD) and constant.

Each schedule is a pure function of the step (``lr_factor``) so it can be tested and plotted
without an optimizer; ``build_scheduler`` wraps it in a ``LambdaLR``.
"""
from __future__ import annotations

import math

import torch

from longtrain.config import OptimConfig


def lr_factor(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Multiplier of ``cfg.lr`` for optimizer step ``step`` (0-based).

    Warmup is linear from lr/warmup to lr over ``warmup_steps`` steps. Cosine then decays to
    ``min_lr_ratio * lr`` at ``max_steps``. WSD holds lr until the last ``decay_fraction`` of the
    run and then decays linearly to ``min_lr_ratio * lr`` (the "stable" phase lets a run be
    extended or branched from any checkpoint before the decay).
    """
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    floor = cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        span = max(1, max_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    decay_steps = max(1, round(cfg.decay_fraction * max_steps))
    decay_start = max(cfg.warmup_steps, max_steps - decay_steps)
    if step < decay_start:
        return 1.0
    progress = min(1.0, (step - decay_start + 1) / max(1, max_steps - decay_start))
    return 1.0 - (1.0 - floor) * progress


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_steps: int):
    """A ``LambdaLR`` following :func:`lr_factor`; call ``.step()`` once per optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg, max_steps))

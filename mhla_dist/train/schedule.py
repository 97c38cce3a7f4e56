"""Learning-rate schedules: linear warmup, then cosine decay, warmup-stable-decay, or constant."""

from __future__ import annotations

import math

from mhla_dist.config import ScheduleConfig


def learning_rate(step: int, total_steps: int, peak: float, cfg: ScheduleConfig) -> float:
    """The learning rate of optimizer step `step` (0-based) out of `total_steps`."""
    floor = peak * cfg.min_lr_ratio
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    if cfg.kind == "constant":
        return peak
    if cfg.kind == "cosine":
        span = max(1, total_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    # wsd: stable at the peak, then a linear decay over the last decay_fraction of the steps
    decay_steps = max(1, round(total_steps * cfg.decay_fraction))
    decay_start = total_steps - decay_steps
    if step < decay_start:
        return peak
    return peak + (floor - peak) * min(1.0, (step - decay_start + 1) / decay_steps)

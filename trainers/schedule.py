"""The learning-rate schedule: linear warmup, cosine decay to a floor. A function of the step
alone, so a resume on any number of workers continues it exactly."""

from __future__ import annotations

import math
from collections.abc import Callable

from configs.schema import Config


def lr_factor(cfg: Config) -> Callable[[int], float]:
    warmup, decay, floor = cfg.optim.warmup_steps, cfg.optim.decay_steps, cfg.optim.min_lr_ratio

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if step >= decay:
            return floor
        progress = (step - warmup) / (decay - warmup)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor

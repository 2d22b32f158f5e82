"""Learning-rate schedules as LambdaLR multipliers: Noam (as CPM-Ant via BMTrain) and warmup + cosine."""

from __future__ import annotations

import math


def noam(warmup: int):
    """BMTrain's NoamLRScheduler: lr * step / warmup^1.5 while warming up, then lr / sqrt(step).

    With lr 0.1 and warmup 2000 (CPM-Ant) the peak is 0.1 / sqrt(2000) = 2.2e-3.
    """

    def f(step: int) -> float:
        s = step + 1
        return min(s / warmup**1.5, 1.0 / math.sqrt(s))

    return f


def cosine(warmup: int, total: int, min_ratio: float):
    def f(step: int) -> float:
        s = step + 1
        if s <= warmup:
            return s / warmup
        progress = min(1.0, (s - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


SCHEDULES = {"noam": lambda cfg: noam(cfg.warmup_steps),
             "cosine": lambda cfg: cosine(cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)}

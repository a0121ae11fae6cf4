"""Learning-rate schedules: linear warm-up, then cosine, step decay or constant."""

from __future__ import annotations

import math
from collections.abc import Callable


def lr_factor(schedule: dict, base_lr: float, total_steps: int) -> Callable[[int], float]:
    """A ``LambdaLR`` factor: ``step`` counts optimizer steps already taken."""
    warmup = schedule["warmup_steps"]
    kind = schedule["kind"]
    floor = schedule["min_lr"] / base_lr if base_lr > 0 else 0.0
    milestones = sorted(schedule["milestones"])

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if kind == "cosine":
            progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        if kind == "step":
            return schedule["gamma"] ** sum(1 for m in milestones if step >= m)
        return 1.0

    return factor

"""Learning-rate schedules, as ``LambdaLR`` factories the optimizer config refers to."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def warmup_cosine(optimizer: Optimizer, total_steps: int, warmup_steps: int = 100, min_lr_ratio: float = 0.1) -> LambdaLR:
    """Linear warm-up over ``warmup_steps`` optimizer steps, then cosine decay to
    ``min_lr_ratio * lr`` at ``total_steps``; flat at the minimum afterwards."""
    if total_steps < 1:
        raise ValueError(f"warmup_cosine needs total_steps >= 1, got {total_steps}")
    if warmup_steps < 0:
        raise ValueError(f"optim.scheduler.warmup_steps must be >= 0, got {warmup_steps}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"optim.scheduler.min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    warmup_steps = min(warmup_steps, total_steps)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)

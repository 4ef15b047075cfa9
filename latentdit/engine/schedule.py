"""The learning-rate schedule of both trainers: linear warm-up, then cosine decay to a floor.

``lr_at(step, lr, warmup_steps, total_steps, min_lr_ratio)``: ``lr · (step + 1) / warmup_steps`` during
the warm-up, then ``lr · (r + (1 − r) · (1 + cos(π · p)) / 2)`` with ``p`` the fraction of the steps
after the warm-up that are done (capped at 1) and ``r = min_lr_ratio``. With ``min_lr_ratio = 1`` the
second phase is the constant ``lr`` (the DiT recipe: warm-up, then constant).
"""

from __future__ import annotations

import math

import torch


def lr_at(step: int, lr: float, warmup_steps: int, total_steps: int = 0, min_lr_ratio: float = 1.0) -> float:
    """The learning rate of optimizer step ``step`` (counted from 0)."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def lr_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int = 0,
                 min_lr_ratio: float = 1.0) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` over :func:`lr_at` as a factor of each group's initial rate (stepped once per
    optimizer step; its state goes into checkpoints)."""

    def factor(step: int) -> float:
        return lr_at(step, 1.0, warmup_steps, total_steps, min_lr_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Give every parameter group of ``optimizer`` the learning rate ``lr``."""
    for group in optimizer.param_groups:
        group["lr"] = lr

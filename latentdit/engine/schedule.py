"""The learning-rate schedule of both trainers: a linear warm-up, then ``constant``, ``cosine`` or ``wsd``.

``lr_at(step, lr, warmup_steps, total_steps, min_lr_ratio, schedule=..., decay_fraction=..., run_fraction=...)``
is ``lr · (step + 1) / warmup_steps`` during the warm-up (steps counted from 0), then, with
``r = min_lr_ratio``:

- ``constant``: ``lr`` (the DiT recipe);
- ``cosine``: ``lr · (r + (1 − r) · (1 + cos(π · p)) / 2)``, ``p`` the fraction of the steps after the
  warm-up that are done (capped at 1); with ``r = 1`` this is the constant ``lr``;
- ``wsd`` (warm-up, stable, decay): ``lr`` until the last ``decay_fraction`` of the run, then linear down
  to ``r · lr`` at its end: ``lr · (r + (1 − r) · (1 − f) / decay_fraction)`` once ``1 − f < decay_fraction``,
  ``f = step / total_steps`` the fraction of the run done (capped at 1).

A run bounded by wall time passes ``run_fraction``, the fraction of its time budget used, which then
stands for ``p`` and ``f`` (the warm-up still counts steps). The trainers apply the schedule as a
factor of each group's initial rate through :func:`lr_scheduler` (a ``LambdaLR``, saved in checkpoints)
or set it directly with :func:`set_lr`.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from latentdit.errors import LatentDiTError

LR_SCHEDULES = ("constant", "cosine", "wsd")


def check_schedule(schedule: str, min_lr_ratio: float, decay_fraction: float, section: str = "train") -> None:
    """Refuse settings :func:`lr_at` cannot follow (messages name ``<section>.<field>``)."""
    if schedule not in LR_SCHEDULES:
        raise LatentDiTError(f"{section}.lr_schedule: expected one of {', '.join(LR_SCHEDULES)}, got {schedule!r}")
    if not (math.isfinite(min_lr_ratio) and 0.0 <= min_lr_ratio <= 1.0):
        raise LatentDiTError(f"{section}.min_lr_ratio: expected a number in [0, 1], got {min_lr_ratio!r}")
    if not (math.isfinite(decay_fraction) and 0.0 < decay_fraction <= 1.0):
        raise LatentDiTError(f"{section}.decay_fraction: expected a number in (0, 1], got {decay_fraction!r}")


def lr_at(step: int, lr: float, warmup_steps: int, total_steps: int = 0, min_lr_ratio: float = 1.0, *,
          schedule: str = "cosine", decay_fraction: float = 0.2, run_fraction: float | None = None) -> float:
    """The learning rate of optimizer step ``step`` (counted from 0)."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    if schedule == "cosine":
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps) if run_fraction is None \
            else run_fraction
        progress = min(1.0, progress)
        return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
    if schedule == "wsd":
        done = step / max(1, total_steps) if run_fraction is None else run_fraction
        left = 1.0 - min(1.0, done)
        if left >= decay_fraction:
            return lr
        return lr * (min_lr_ratio + (1 - min_lr_ratio) * left / decay_fraction)
    raise LatentDiTError(f"lr_schedule: expected one of {', '.join(LR_SCHEDULES)}, got {schedule!r}")


def lr_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int = 0,
                 min_lr_ratio: float = 1.0, *, schedule: str = "cosine", decay_fraction: float = 0.2,
                 run_fraction: Callable[[], float | None] = lambda: None) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` over :func:`lr_at` as a factor of each group's initial rate (stepped once per
    optimizer step; its state goes into checkpoints). ``run_fraction()`` is read at every step: the
    fraction of a time budget used, or None for a run measured in steps."""

    def factor(step: int) -> float:
        return lr_at(step, 1.0, warmup_steps, total_steps, min_lr_ratio, schedule=schedule,
                     decay_fraction=decay_fraction, run_fraction=run_fraction())

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Give every parameter group of ``optimizer`` the learning rate ``lr``."""
    for group in optimizer.param_groups:
        group["lr"] = lr

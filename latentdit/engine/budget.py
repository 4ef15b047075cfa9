"""The time budget of a run (``max_minutes``), agreed across processes.

With several processes rank 0's clock decides, broadcast to the others, so that all of them stop after
the same step and a time-based LR schedule sees the same fraction everywhere; the question is a
collective, so it is asked only at steps every process reaches together (the trainers ask at log and
checkpoint steps, the DiT trainer at every step when its LR schedule follows the budget). A single
process asks at every step.

A resumed run continues its budget: ``elapsed_s`` is the training time its checkpoint had used
(:attr:`TimeBudget.agreed_elapsed_s`, stored with the checkpoint).
"""

from __future__ import annotations

import time
from typing import Callable

import torch


class TimeBudget:
    """``max_minutes`` of wall time from construction, less ``elapsed_s`` already used (0 = no budget).
    ``clock`` is a test seam."""

    def __init__(self, max_minutes: float, accelerator, clock: Callable[[], float] = time.monotonic,
                 elapsed_s: float = 0.0) -> None:
        self.max_minutes, self.accelerator, self.clock = max_minutes, accelerator, clock
        self.t0 = clock()
        self.elapsed_before_s = float(elapsed_s)
        self.agreed_elapsed_s = float(elapsed_s)  # the last answer all processes share

    def elapsed_s(self) -> float:
        return self.elapsed_before_s + (self.clock() - self.t0)

    def fraction(self) -> float:
        """The fraction of the budget used at the last agreed measurement (0 without a budget)."""
        return self.agreed_elapsed_s / (self.max_minutes * 60) if self.max_minutes > 0 else 0.0

    def spent(self, sync_point: bool) -> bool:
        """Measure (and agree on) the time used; whether the budget has run out. With several processes
        only a ``sync_point`` (a step every process calls this at) measures or answers True."""
        world = self.accelerator.num_processes
        if self.max_minutes <= 0 or not (world == 1 or sync_point):
            return False
        elapsed = self.elapsed_s()
        if world > 1:
            from accelerate.utils import broadcast

            value = torch.tensor([elapsed], dtype=torch.float64, device=self.accelerator.device)
            elapsed = float(broadcast(value, from_process=0).item())
        self.agreed_elapsed_s = elapsed
        return elapsed >= self.max_minutes * 60

"""The time budget of a run (``max_minutes``), agreed across processes.

With several processes rank 0's clock decides, broadcast to the others, so that all of them stop after
the same step; the question is a collective, so it is asked only at steps every process reaches
together (the trainers ask at log and checkpoint steps). A single process asks at every step.
"""

from __future__ import annotations

import time
from typing import Callable

import torch


class TimeBudget:
    """``max_minutes`` of wall time from construction (0 = no budget). ``clock`` is a test seam."""

    def __init__(self, max_minutes: float, accelerator, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_minutes, self.accelerator, self.clock = max_minutes, accelerator, clock
        self.t0 = clock()

    def elapsed_s(self) -> float:
        return self.clock() - self.t0

    def spent(self, sync_point: bool) -> bool:
        """Whether the budget has run out. With several processes only a ``sync_point`` (a step every
        process calls this at) can answer True."""
        world = self.accelerator.num_processes
        if self.max_minutes <= 0 or not (world == 1 or sync_point):
            return False
        spent = self.elapsed_s() >= self.max_minutes * 60
        if world > 1:
            from accelerate.utils import broadcast

            flag = torch.tensor([float(spent)], device=self.accelerator.device)
            spent = bool(broadcast(flag, from_process=0).item())
        return spent

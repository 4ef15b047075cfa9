"""Data order and per-step randomness that do not depend on the number of processes.

Step ``s`` (0-based; the update that makes the run's step count ``s + 1``) uses the global batch
``perm_e[p·G : (p+1)·G]`` where ``e, p = divmod(s, steps_per_epoch)`` and ``perm_e`` is a permutation
of the dataset seeded by ``(seed, e)``. The G rows are split into ``grad_accum × num_processes``
equal slices: micro-step ``a`` of process ``r`` takes slice ``a·num_processes + r``. The training times,
diffusion noise and label-drop mask of the whole global batch are drawn from a generator seeded by
``(seed, s)`` and sliced the same way. Dataset items are pure functions of (seed, epoch, index)
(see :class:`latentdit.data.latents.LatentDataset`), so 2 processes × B rows compute the same
batch as 1 process × 2B rows, and a resumed run continues with the very same data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch.utils.data import Dataset, Sampler

from latentdit.seeding import seed_for


def epoch_permutation(num_items: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed_for("latentdit-data-order", seed, epoch))
    return torch.randperm(num_items, generator=g)


@dataclass(frozen=True)
class BatchLayout:
    """How one global batch of ``global_batch_size`` rows is split over processes and micro-steps."""

    global_batch_size: int
    num_processes: int
    grad_accum: int
    rank: int

    @property
    def micro_batch_size(self) -> int:
        return self.global_batch_size // (self.num_processes * self.grad_accum)

    def rows(self, micro_step: int) -> slice:
        """Rows of the global batch handled by this process at micro-step ``micro_step``."""
        b = self.micro_batch_size
        k = micro_step * self.num_processes + self.rank
        return slice(k * b, (k + 1) * b)


class StepBatchSampler(Sampler[list]):
    """Yields, for each step in ``[start_step, end_step)``, this process's ``grad_accum`` micro-batches
    as lists of ``(epoch, index)`` keys (see :class:`EpochIndexed`)."""

    def __init__(self, num_items: int, layout: BatchLayout, seed: int, start_step: int, end_step: int) -> None:
        self.num_items = num_items
        self.layout = layout
        self.seed = seed
        self.start_step = start_step
        self.end_step = end_step
        self.steps_per_epoch = num_items // layout.global_batch_size

    def __len__(self) -> int:
        return max(0, self.end_step - self.start_step) * self.layout.grad_accum

    def __iter__(self) -> Iterator[list]:
        G = self.layout.global_batch_size
        cached_epoch, perm = -1, None
        for step in range(self.start_step, self.end_step):
            epoch, pos = divmod(step, self.steps_per_epoch)
            if epoch != cached_epoch:
                perm, cached_epoch = epoch_permutation(self.num_items, self.seed, epoch), epoch
            batch = perm[pos * G:(pos + 1) * G]
            for a in range(self.layout.grad_accum):
                yield [(epoch, int(i)) for i in batch[self.layout.rows(a)]]


class EpochIndexed(Dataset):
    """Wraps a dataset with ``set_epoch``; items are fetched by ``(epoch, index)`` keys, so the epoch is
    right inside DataLoader worker processes too."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset
        self._epoch: int | None = None

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        if epoch != self._epoch:
            self.dataset.set_epoch(epoch)
            self._epoch = epoch
        return self.dataset[index]


@dataclass
class StepRandomness:
    """Training times, diffusion noise and label-drop mask for the whole global batch of one step."""

    t: torch.Tensor
    noise: torch.Tensor
    drop: torch.Tensor

    @classmethod
    def draw(cls, seed: int, step: int, global_batch_size: int, latent_shape: tuple[int, ...],
             process: Any, drop_prob: float) -> "StepRandomness":
        """One generator seeded by (seed, step) draws the times (``process.draw_time``: integer indices
        for ddpm, floats in [0, 1] for flow), then the noise, then the drop mask."""
        g = torch.Generator().manual_seed(seed_for("latentdit-step", seed, step))
        t = process.draw_time(global_batch_size, g)
        noise = torch.randn((global_batch_size, *latent_shape), generator=g)
        drop = (torch.rand(global_batch_size, generator=g) < drop_prob).long()
        return cls(t, noise, drop)

    def slice(self, rows: slice) -> "StepRandomness":
        return StepRandomness(self.t[rows], self.noise[rows], self.drop[rows])

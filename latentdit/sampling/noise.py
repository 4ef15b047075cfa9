"""Per-sample noise: sample ``i`` of a run seeded ``seed`` takes its initial and step noise from its own
generator, so it does not depend on the batch split or the number of processes."""

from __future__ import annotations

from typing import Sequence

import torch

from latentdit.diffusion.samplers import PerSampleNoise
from latentdit.seeding import seed_for


def sample_generator(seed: int, index: int) -> torch.Generator:
    """The CPU generator of global sample ``index`` under ``seed``: its initial noise, then its step noise."""
    return torch.Generator().manual_seed(seed_for("latentdit-sample", seed, index))


def per_sample_noise(seed: int, indices: Sequence[int]) -> PerSampleNoise:
    """Noise for the samples ``indices``: row j from :func:`sample_generator` ``(seed, indices[j])``."""
    return PerSampleNoise([sample_generator(seed, i) for i in indices])

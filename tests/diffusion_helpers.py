"""Shared by the diffusion tests: shapes, seeded normals, a toy network, diffusers' DDPM scheduler."""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler

SHAPE = (3, 4, 6, 6)
F64 = torch.float64  # diffusers keeps float32 schedule arrays; float64 inputs isolate that rounding
DIFFUSERS_SCHEDULE = {"linear": "linear", "cosine": "squaredcos_cap_v2"}


def randn(*shape: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def toy_model(x: torch.Tensor, t_original: torch.Tensor) -> torch.Tensor:
    """A deterministic stand-in for a network: depends on x and on the ORIGINAL timestep index."""
    phase = (t_original.to(x.dtype) / 37.0).reshape(-1, *([1] * (x.ndim - 1)))
    return 0.6 * torch.tanh(x) + 0.2 * torch.sin(phase + x)


def ddpm_scheduler(schedule: str, variance_type: str, **kw) -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule=DIFFUSERS_SCHEDULE[schedule],
                         variance_type=variance_type, clip_sample=False, prediction_type="epsilon", **kw)

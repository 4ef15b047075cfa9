"""Noise schedules: the per-step variances beta_t of the forward process, as float64 numpy arrays."""

from __future__ import annotations

import math

import numpy as np

from latentdit.errors import LatentDiTError

SCHEDULES = ("linear", "cosine")

# Linear schedule of DDPM, defined for 1000 steps and rescaled for other step counts so the
# total amount of noise stays comparable.
LINEAR_BETA_START = 1e-4
LINEAR_BETA_END = 0.02
LINEAR_REFERENCE_STEPS = 1000

# Cosine schedule of Improved DDPM: alpha_bar(s) = cos²((s + offset) / (1 + offset) · π/2), betas capped.
COSINE_OFFSET = 0.008
COSINE_MAX_BETA = 0.999


def _check_num_timesteps(num_timesteps: int) -> int:
    if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, (int, np.integer)) or num_timesteps < 1:
        raise LatentDiTError(f"num_timesteps must be a positive integer, got {num_timesteps!r}")
    return int(num_timesteps)


def linear_betas(num_timesteps: int = 1000) -> np.ndarray:
    """Betas rising linearly from 1e-4 to 0.02 (both scaled by 1000 / num_timesteps)."""
    n = _check_num_timesteps(num_timesteps)
    scale = LINEAR_REFERENCE_STEPS / n
    return np.linspace(scale * LINEAR_BETA_START, scale * LINEAR_BETA_END, n, dtype=np.float64)


def cosine_alpha_bar(s: np.ndarray | float) -> np.ndarray:
    """Cumulative signal level alpha_bar at continuous time s in [0, 1] of the cosine schedule."""
    s = np.asarray(s, dtype=np.float64)
    return np.cos((s + COSINE_OFFSET) / (1.0 + COSINE_OFFSET) * (math.pi / 2)) ** 2


def cosine_betas(num_timesteps: int = 1000, max_beta: float = COSINE_MAX_BETA) -> np.ndarray:
    """Betas of the cosine schedule: beta_i = 1 - alpha_bar((i+1)/T) / alpha_bar(i/T), capped at max_beta."""
    n = _check_num_timesteps(num_timesteps)
    grid = np.arange(n + 1, dtype=np.float64) / n
    alpha_bar = cosine_alpha_bar(grid)
    betas = 1.0 - alpha_bar[1:] / alpha_bar[:-1]
    return np.minimum(betas, max_beta)


def get_betas(schedule: str = "linear", num_timesteps: int = 1000) -> np.ndarray:
    """Betas of a named schedule ("linear" or "cosine") for ``num_timesteps`` steps, float64."""
    if schedule == "linear":
        return linear_betas(num_timesteps)
    if schedule == "cosine":
        return cosine_betas(num_timesteps)
    raise LatentDiTError(f"unknown noise schedule {schedule!r}; expected one of {', '.join(SCHEDULES)}")

"""The denoising trajectory: the sampler's state x_t and estimate x̂0 recorded through its callback at a
few of its steps, decoded and drawn by :func:`latentdit.visualize.save_trajectory_grid`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch

from latentdit.errors import LatentDiTError
from latentdit.sampling.images import decode_images
from latentdit.sampling.labels import label_text
from latentdit.sampling.noise import per_sample_noise
from latentdit.sampling.run import resolve_settings, sample_latents
from latentdit.sampling.settings import ResolvedSettings, SamplerSettings
from latentdit.visualize import save_trajectory_grid


def trajectory_steps(num_steps: int, num_points: int) -> list[int]:
    """Which of a sampler's ``num_steps`` steps to show: ``num_points`` (at most) evenly spread step
    indices, always the first and the last."""
    if num_points < 1:
        raise LatentDiTError(f"a trajectory needs at least one point, got {num_points}")
    if num_points == 1:
        return [num_steps - 1]
    return sorted({round(k * (num_steps - 1) / (num_points - 1)) for k in range(num_points)})


def record_trajectory(model: torch.nn.Module, labels: Sequence[int],
                      settings: SamplerSettings | ResolvedSettings | None = None, *, process=None, seed: int = 0,
                      indices: Sequence[int] | None = None, num_points: int = 8,
                      device: str | torch.device | None = None,
                      dtype: torch.dtype | None = None) -> tuple[list[dict], torch.Tensor]:
    """Sample ``labels`` in one batch and keep the sampler's state x_t and estimate x̂0 at
    :func:`trajectory_steps` of its steps. Sample j has the noise of global sample ``indices[j]``
    (default j) under ``seed``, so it is the same sample :func:`latentdit.sampling.sample_seeded` draws
    at that index.

    Returns (points, final latents): each point is the sampler callback's ``{"i", "t", "x", "denoised"}``
    (latents on the CPU), in chain order.
    """
    settings = resolve_settings(settings, process, int(model.in_channels))
    keep = set(trajectory_steps(settings.num_steps, num_points))
    points: list[dict] = []

    def callback(info: dict) -> None:
        if info["i"] in keep:
            points.append({"i": info["i"], "t": info["t"], "x": info["x"].detach().float().cpu(),
                           "denoised": info["denoised"].detach().float().cpu()})

    indices = list(range(len(labels))) if indices is None else [int(i) for i in indices]
    if len(indices) != len(labels):
        raise LatentDiTError(f"record_trajectory: {len(indices)} sample indices for {len(labels)} labels")
    final = sample_latents(model, labels, settings, noise=per_sample_noise(seed, indices), device=device,
                           dtype=dtype, callback=callback)
    return points, final.cpu()


def save_denoising_trajectory(model: torch.nn.Module, vae, labels: Sequence[int], path: str | os.PathLike,
                              settings: SamplerSettings | ResolvedSettings | None = None, *, process=None,
                              seed: int = 0, indices: Sequence[int] | None = None, num_points: int = 8,
                              class_names: Sequence[str] | None = None, device: str | torch.device | None = None,
                              dtype: torch.dtype | None = None, norm=None) -> Path:
    """Sample ``labels`` with the chosen sampler and write how each sample forms: decoded x_t and x̂0 at
    ~``num_points`` points along the chain (see :func:`record_trajectory`,
    :func:`latentdit.visualize.save_trajectory_grid`); ``norm``: the latents'
    :class:`latentdit.data.latent_norm.LatentNorm` (None: the VAE's scaling factor)."""
    points, _ = record_trajectory(model, labels, settings, process=process, seed=seed, indices=indices,
                                  num_points=num_points, device=device, dtype=dtype)
    names = [label_text(int(lab), class_names) for lab in labels]
    dev = device if device is not None else next(model.parameters()).device
    return save_trajectory_grid(points, lambda z: decode_images(vae, z.to(dev), norm=norm), names, path)

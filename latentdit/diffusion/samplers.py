"""Ancestral DDPM and DDIM sampling over a (possibly respaced) :class:`GaussianDiffusion`.

``model_fn(x, t_original)`` returns the model output for a batch; ``t_original`` is a long tensor [N]
of original training indices (the respacing map is applied here). Guidance is the caller's business:
wrap the model in ``model_fn``. Randomness comes only from the ``generator`` (or the ``noise`` given),
so sampling is deterministic under a seed. The generator must live on ``device``.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from latentdit.diffusion.gaussian import GaussianDiffusion
from latentdit.errors import LatentDiTError

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _step_noise(x: torch.Tensor, noise: torch.Tensor | None, generator: torch.Generator | None) -> torch.Tensor:
    if noise is None:
        return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    if noise.shape != x.shape:
        raise LatentDiTError(f"step noise shape {tuple(noise.shape)} differs from sample shape {tuple(x.shape)}")
    return noise.to(device=x.device, dtype=x.dtype)


def _check_eta(eta: float) -> None:
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not math.isfinite(eta) or eta < 0:
        raise LatentDiTError(f"DDIM eta must be a finite number >= 0, got {eta!r}")


def _nonzero_mask(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return (t != 0).to(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))


def ddpm_step(diffusion: GaussianDiffusion, model_output: torch.Tensor, x: torch.Tensor, t: torch.Tensor | int,
              noise: torch.Tensor | None = None, generator: torch.Generator | None = None,
              clip_denoised: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One ancestral step x_t → x_{t-1} = mean + exp(0.5·log var)·z (z = 0 at t == 0).

    ``t`` is an index of ``diffusion`` (respaced index for a respaced one). ``noise`` is z; drawn from
    ``generator`` when not given. Returns (x_prev, pred_x0).
    """
    t = diffusion._as_index(t, x)
    out = diffusion.p_mean_variance(model_output, x, t, clip_denoised=clip_denoised)
    z = _step_noise(x, noise, generator)
    x_prev = out["mean"] + _nonzero_mask(t, x) * torch.exp(0.5 * out["log_variance"]) * z
    return x_prev, out["pred_x0"]


def ddim_step(diffusion: GaussianDiffusion, model_output: torch.Tensor, x: torch.Tensor, t: torch.Tensor | int,
              eta: float = 0.0, noise: torch.Tensor | None = None, generator: torch.Generator | None = None,
              clip_denoised: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM step from index t to t-1 of ``diffusion`` (abar_prev = 1 at t == 0).

    x_{t-1} = sqrt(abar_prev)·x0 + sqrt(1 - abar_prev - σ²)·eps + σ·z with
    σ = eta·sqrt((1 - abar_prev)/(1 - abar_t))·sqrt(1 - abar_t/abar_prev). eps is re-derived from the
    (possibly clipped) x0. Noise is drawn only when eta > 0. Returns (x_prev, pred_x0).
    """
    _check_eta(eta)
    t = diffusion._as_index(t, x)
    out = diffusion.p_mean_variance(model_output, x, t, clip_denoised=clip_denoised)
    pred_x0 = out["pred_x0"]
    eps = diffusion.predict_eps_from_x0(x, t, pred_x0) if clip_denoised else out["eps"]
    abar = diffusion._gather("alphas_cumprod", t, x)
    abar_prev = diffusion._gather("alphas_cumprod_prev", t, x)
    sigma = eta * torch.sqrt((1.0 - abar_prev) / (1.0 - abar)) * torch.sqrt(1.0 - abar / abar_prev)
    x_prev = torch.sqrt(abar_prev) * pred_x0 + torch.sqrt((1.0 - abar_prev - sigma ** 2).clamp(min=0.0)) * eps
    if eta > 0:
        x_prev = x_prev + _nonzero_mask(t, x) * sigma * _step_noise(x, noise, generator)
    return x_prev, pred_x0


def _initial_noise(shape: Sequence[int], generator: torch.Generator | None, device: torch.device | str,
                   noise: torch.Tensor | None) -> torch.Tensor:
    if noise is not None:
        if tuple(noise.shape) != tuple(shape):
            raise LatentDiTError(f"initial noise shape {tuple(noise.shape)} differs from the requested shape "
                                 f"{tuple(shape)}")
        return noise.to(device=device, dtype=torch.float32)
    return torch.randn(tuple(shape), generator=generator, device=device, dtype=torch.float32)


def _loop(diffusion: GaussianDiffusion, model_fn: ModelFn, shape: Sequence[int], step: Callable[..., tuple],
          generator: torch.Generator | None, device: torch.device | str, noise: torch.Tensor | None,
          progress: bool, desc: str) -> torch.Tensor:
    x = _initial_noise(shape, generator, device, noise)
    indices = range(diffusion.num_timesteps - 1, -1, -1)
    if progress:
        from tqdm.auto import tqdm

        indices = tqdm(indices, desc=desc, leave=False)
    for i in indices:
        t = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)
        with torch.no_grad():
            model_output = model_fn(x, diffusion.model_timesteps(t))
            x, _ = step(model_output, x, t)
    return x


def ddpm_sample(diffusion: GaussianDiffusion, model_fn: ModelFn, shape: Sequence[int],
                generator: torch.Generator | None = None, device: torch.device | str = "cpu",
                noise: torch.Tensor | None = None, progress: bool = False,
                clip_denoised: bool = False) -> torch.Tensor:
    """Ancestral sampling from x_T (``noise`` or drawn from ``generator``) through all steps of
    ``diffusion``; returns x_0 (float32 latents of ``shape``)."""
    def step(out: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> tuple:
        return ddpm_step(diffusion, out, x, t, generator=generator, clip_denoised=clip_denoised)

    return _loop(diffusion, model_fn, shape, step, generator, device, noise, progress, "DDPM")


def ddim_sample(diffusion: GaussianDiffusion, model_fn: ModelFn, shape: Sequence[int],
                generator: torch.Generator | None = None, device: torch.device | str = "cpu",
                noise: torch.Tensor | None = None, progress: bool = False, eta: float = 0.0,
                clip_denoised: bool = False) -> torch.Tensor:
    """DDIM sampling (``eta`` = 0: deterministic given x_T) through all steps of ``diffusion``
    (respace it, e.g. ``create_diffusion("ddim50")``); returns x_0 (float32 latents of ``shape``)."""
    _check_eta(eta)

    def step(out: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> tuple:
        return ddim_step(diffusion, out, x, t, eta=eta, generator=generator, clip_denoised=clip_denoised)

    return _loop(diffusion, model_fn, shape, step, generator, device, noise, progress, "DDIM")

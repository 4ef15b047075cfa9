"""Samplers: from noise to latents along a grid of times, all with one signature::

    sampler(model_fn, x, grid, *, noise=None, callback=None, progress=False, **options) -> x0

* ``model_fn(x, t_model)`` returns the network's output for a batch (guidance is the caller's business:
  wrap the model); ``t_model`` is a tensor [N] of the DiT's timestep input (original training indices
  for the DDPM process, ``t · FLOW_MODEL_TIME_SCALE`` for flow).
* ``x`` is the initial noise x_T (float32); the result is x_0.
* ``grid`` says where the chain goes: a (respaced) :class:`GaussianDiffusion` for ``ddpm`` / ``ddim``,
  a DPM-Solver++ scheduler from :func:`make_dpm_solver` for ``dpm-solver``, a
  :class:`latentdit.diffusion.flow.FlowGrid` for ``euler`` / ``heun`` / ``euler-maruyama``; a process
  makes the grid of each of its samplers (:meth:`latentdit.diffusion.base.Process.sampling_grid`).
* ``noise`` is a :class:`NoiseSource`: stochastic samplers draw each step's fresh noise from it, so
  sampling is deterministic under a seed (per-sample sources make it independent of the batch split).
* ``callback(info)`` is called once per model evaluation on the chain with ``info = {"x": x_t,
  "i": step index, "t": time, "denoised": x0 estimate}``; ``t`` is the process's own time (original
  timestep index for ddpm, flow time in [0, 1] for flow) and ``x`` the state the model was evaluated at.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from latentdit.diffusion.flow import FlowGrid
from latentdit.diffusion.gaussian import GaussianDiffusion
from latentdit.errors import LatentDiTError

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Callable[[dict[str, Any]], None]


# ----------------------------------------------------------------------------------------------
# Noise
# ----------------------------------------------------------------------------------------------

class NoiseSource:
    """Standard normal draws for a batch; :class:`GeneratorNoise` or :class:`PerSampleNoise`."""

    def draw(self, shape: Sequence[int], device: torch.device | str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        raise NotImplementedError

    def like(self, x: torch.Tensor) -> torch.Tensor:
        return self.draw(x.shape, x.device, x.dtype)


class GeneratorNoise(NoiseSource):
    """Draws for the whole batch from one generator (on the generator's device, then moved)."""

    def __init__(self, generator: torch.Generator | None) -> None:
        self.generator = generator

    def draw(self, shape, device, dtype=torch.float32):
        where = self.generator.device if self.generator is not None else device
        return torch.randn(tuple(shape), generator=self.generator, device=where, dtype=dtype).to(device)


class PerSampleNoise(NoiseSource):
    """Row j of every draw comes from its own CPU generator ``generators[j]``: a sample's initial and
    step noise then depend only on its generator, not on which batch (or process) it is sampled in."""

    def __init__(self, generators: Sequence[torch.Generator]) -> None:
        self.generators = list(generators)

    def draw(self, shape, device, dtype=torch.float32):
        shape = tuple(shape)
        if shape[0] != len(self.generators):
            raise LatentDiTError(f"noise for {shape[0]} samples requested from {len(self.generators)} per-sample "
                                 "generators")
        rows = [torch.randn(shape[1:], generator=g, dtype=dtype) for g in self.generators]
        return torch.stack(rows).to(device)


def _step_noise(x: torch.Tensor, noise: torch.Tensor | None, generator: torch.Generator | None) -> torch.Tensor:
    if noise is None:
        return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    if noise.shape != x.shape:
        raise LatentDiTError(f"step noise shape {tuple(noise.shape)} differs from sample shape {tuple(x.shape)}")
    return noise.to(device=x.device, dtype=x.dtype)


def _progress(steps: range, progress: bool, desc: str):
    if not progress:
        return steps
    from tqdm.auto import tqdm

    return tqdm(steps, desc=desc, leave=False)


# ----------------------------------------------------------------------------------------------
# DDPM process: single steps
# ----------------------------------------------------------------------------------------------

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
    t = diffusion.as_index(t, x)
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
    t = diffusion.as_index(t, x)
    out = diffusion.p_mean_variance(model_output, x, t, clip_denoised=clip_denoised)
    pred_x0 = out["pred_x0"]
    eps = diffusion.predict_eps_from_x0(x, t, pred_x0) if clip_denoised else out["eps"]
    abar = diffusion.gather("alphas_cumprod", t, x)
    abar_prev = diffusion.gather("alphas_cumprod_prev", t, x)
    sigma = eta * torch.sqrt((1.0 - abar_prev) / (1.0 - abar)) * torch.sqrt(1.0 - abar / abar_prev)
    x_prev = torch.sqrt(abar_prev) * pred_x0 + torch.sqrt((1.0 - abar_prev - sigma ** 2).clamp(min=0.0)) * eps
    if eta > 0:
        x_prev = x_prev + _nonzero_mask(t, x) * sigma * _step_noise(x, noise, generator)
    return x_prev, pred_x0


# ----------------------------------------------------------------------------------------------
# DDPM process: samplers
# ----------------------------------------------------------------------------------------------

def _gaussian_chain(model_fn: ModelFn, x: torch.Tensor, diffusion: GaussianDiffusion, step: Callable[..., tuple],
                    callback: Callback | None, progress: bool, desc: str) -> torch.Tensor:
    for i in _progress(range(diffusion.num_timesteps), progress, desc):
        index = diffusion.num_timesteps - 1 - i
        t = torch.full((x.shape[0],), index, dtype=torch.long, device=x.device)
        t_model = diffusion.model_timesteps(t)
        with torch.no_grad():
            x_next, pred_x0 = step(model_fn(x, t_model), x, t)
        if callback is not None:
            callback({"x": x, "i": i, "t": int(t_model[0]), "denoised": pred_x0})
        x = x_next
    return x


def sample_ddpm(model_fn: ModelFn, x: torch.Tensor, grid: GaussianDiffusion, *, noise: NoiseSource | None = None,
                callback: Callback | None = None, progress: bool = False, clip_denoised: bool = False) -> torch.Tensor:
    """Ancestral sampling through every step of ``grid`` (respace it: ``create_diffusion("250")``)."""
    noise = noise or GeneratorNoise(None)

    def step(out: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> tuple:
        return ddpm_step(grid, out, x, t, noise=noise.like(x), clip_denoised=clip_denoised)

    return _gaussian_chain(model_fn, x, grid, step, callback, progress, "DDPM")


def sample_ddim(model_fn: ModelFn, x: torch.Tensor, grid: GaussianDiffusion, *, noise: NoiseSource | None = None,
                callback: Callback | None = None, progress: bool = False, eta: float = 0.0,
                clip_denoised: bool = False) -> torch.Tensor:
    """DDIM through every step of ``grid`` (``eta`` = 0: deterministic given x_T; noise is drawn
    only when eta > 0). DDIM's own grid is ``create_diffusion("ddim50")``."""
    _check_eta(eta)
    noise = noise or GeneratorNoise(None)

    def step(out: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> tuple:
        z = noise.like(x) if eta > 0 else None
        return ddim_step(grid, out, x, t, eta=eta, noise=z, clip_denoised=clip_denoised)

    return _gaussian_chain(model_fn, x, grid, step, callback, progress, "DDIM")


def make_dpm_solver(num_steps: int, noise_schedule: str = "linear", diffusion_steps: int = 1000):
    """diffusers' DPM-Solver++ (2nd-order multistep, eps prediction) on our beta schedule, with
    ``num_steps`` timesteps set: the grid of :func:`sample_dpm_solver`."""
    try:
        from diffusers import DPMSolverMultistepScheduler
    except ImportError as e:
        raise LatentDiTError("the dpm-solver sampler needs diffusers: pip install diffusers") from e
    from latentdit.diffusion.schedules import get_betas

    betas = np.asarray(get_betas(noise_schedule, diffusion_steps), dtype=np.float64)
    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=diffusion_steps, trained_betas=betas, algorithm_type="dpmsolver++",
        solver_order=2, prediction_type="epsilon", lower_order_final=True,
    )
    scheduler.set_timesteps(num_steps)
    return scheduler


def sample_dpm_solver(model_fn: ModelFn, x: torch.Tensor, grid, *, noise: NoiseSource | None = None,
                      callback: Callback | None = None, progress: bool = False) -> torch.Tensor:
    """DPM-Solver++ (deterministic: ``noise`` is not used) over the timesteps of the scheduler ``grid``.
    Only the first C output channels (eps) are used; learned-σ channels are ignored."""
    channels = x.shape[1]
    x = x * grid.init_noise_sigma
    abar = grid.alphas_cumprod
    timesteps = grid.timesteps
    for i in _progress(range(len(timesteps)), progress, "DPM-Solver++"):
        t = int(timesteps[i])
        t_batch = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        with torch.no_grad():
            eps = model_fn(x, t_batch)[:, :channels]
        if callback is not None:
            a = float(abar[t])
            callback({"x": x, "i": i, "t": t, "denoised": (x - math.sqrt(1.0 - a) * eps) / math.sqrt(a)})
        x = grid.step(eps, timesteps[i], x).prev_sample
    return x


# ----------------------------------------------------------------------------------------------
# Flow process: ODE and SDE samplers
# ----------------------------------------------------------------------------------------------

def _flow_eval(model_fn: ModelFn, x: torch.Tensor, grid: FlowGrid, t: float) -> tuple[torch.Tensor, torch.Tensor]:
    tt = torch.full((x.shape[0],), t, dtype=torch.float32, device=x.device)
    with torch.no_grad():
        out = model_fn(x, grid.process.model_time(tt))
    return grid.process.velocity_and_x0(out.to(x.dtype), x, tt)


def sample_euler(model_fn: ModelFn, x: torch.Tensor, grid: FlowGrid, *, noise: NoiseSource | None = None,
                 callback: Callback | None = None, progress: bool = False) -> torch.Tensor:
    """Euler on the probability-flow ODE dx/dt = v(x, t), one model evaluation per step (deterministic)."""
    times = grid.times
    for i in _progress(range(grid.num_steps), progress, "Euler"):
        v, x0 = _flow_eval(model_fn, x, grid, times[i])
        if callback is not None:
            callback({"x": x, "i": i, "t": times[i], "denoised": x0})
        x = x + (times[i + 1] - times[i]) * v
    return x


def sample_heun(model_fn: ModelFn, x: torch.Tensor, grid: FlowGrid, *, noise: NoiseSource | None = None,
                callback: Callback | None = None, progress: bool = False) -> torch.Tensor:
    """Heun (2nd order) on the probability-flow ODE: an Euler predictor, then the trapezoid of the
    velocities at both ends. As in EDM the step that lands on t = 0 is a plain Euler step (with
    x-prediction the velocity at t = 0 is not defined), so N steps cost 2N − 1 model evaluations."""
    times = grid.times
    for i in _progress(range(grid.num_steps), progress, "Heun"):
        t, t_next = times[i], times[i + 1]
        v, x0 = _flow_eval(model_fn, x, grid, t)
        if callback is not None:
            callback({"x": x, "i": i, "t": t, "denoised": x0})
        x_euler = x + (t_next - t) * v
        if t_next > 0:
            v_next, _ = _flow_eval(model_fn, x_euler, grid, t_next)
            x = x + (t_next - t) * 0.5 * (v + v_next)
        else:
            x = x_euler
    return x


def sample_ab2(model_fn: ModelFn, x: torch.Tensor, grid: FlowGrid, *, noise: NoiseSource | None = None,
               callback: Callback | None = None, progress: bool = False) -> torch.Tensor:
    """Two-step Adams–Bashforth on the probability-flow ODE: each step extrapolates the velocity from the
    last two evaluations (for steps h and h_prev: v + h/(2·h_prev)·(v − v_prev)), so it is second order at one
    model evaluation per step. The first step, with no earlier velocity, is an Euler step."""
    times = grid.times
    v_prev, h_prev = None, None
    for i in _progress(range(grid.num_steps), progress, "AB2"):
        t, t_next = times[i], times[i + 1]
        v, x0 = _flow_eval(model_fn, x, grid, t)
        if callback is not None:
            callback({"x": x, "i": i, "t": t, "denoised": x0})
        h = t_next - t
        slope = v if v_prev is None else v + (h / (2.0 * h_prev)) * (v - v_prev)
        x = x + h * slope
        v_prev, h_prev = v, h
    return x


def _flow_log_snr(t: float) -> float:
    """λ(t) = log(α_t/σ_t) = log((1 − t)/t) of the flow's interpolation x_t = (1 − t)·x0 + t·ε."""
    if t >= 1.0:
        return -math.inf
    if t <= 0.0:
        return math.inf
    return math.log((1.0 - t) / t)


def sample_dpm_2m(model_fn: ModelFn, x: torch.Tensor, grid: FlowGrid, *, noise: NoiseSource | None = None,
                  callback: Callback | None = None, progress: bool = False) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022) on the flow's probability-flow ODE, one model evaluation per step.

    With α_t = 1 − t, σ_t = t and λ = log(α/σ), the exact solution of the ODE in the data prediction x̂0 is
    x_s = (σ_s/σ_t)·x_t + α_s·∫ e^{−(λ_s−λ)} x̂0 dλ; taking x̂0 constant over a step gives DDIM (first
    order), and extrapolating it linearly in λ from the previous step's x̂0 gives second order:
    D = (1 + 1/(2r))·x̂0 − 1/(2r)·x̂0_prev with r = h_prev/h. A step from t = 1 (λ = −∞) or onto t = 0
    (λ = +∞) has no finite step size in λ and is taken at first order; onto t = 0 it lands on x̂0."""
    times = grid.times
    x0_prev, h_prev = None, None
    for i in _progress(range(grid.num_steps), progress, "DPM-Solver++(2M)"):
        t, t_next = times[i], times[i + 1]
        _, x0 = _flow_eval(model_fn, x, grid, t)
        if callback is not None:
            callback({"x": x, "i": i, "t": t, "denoised": x0})
        h = _flow_log_snr(t_next) - _flow_log_snr(t)
        if t_next <= 0.0:
            x = x0
        else:
            decay = math.exp(-h) if math.isfinite(h) else 0.0     # e^{−h} = (α_t σ_s)/(σ_t α_s)
            d = x0
            if x0_prev is not None and math.isfinite(h) and math.isfinite(h_prev):
                r = h_prev / h
                d = (1.0 + 0.5 / r) * x0 - (0.5 / r) * x0_prev
            x = (t_next / t) * x + (1.0 - t_next) * (1.0 - decay) * d
        x0_prev, h_prev = x0, h
    return x


def sample_euler_maruyama(model_fn: ModelFn, x: torch.Tensor, grid: FlowGrid, *, noise: NoiseSource | None = None,
                          callback: Callback | None = None, progress: bool = False) -> torch.Tensor:
    """Euler–Maruyama on the reverse-time SDE with the flow's marginals (SiT's sampler, diffusion
    coefficient w(t) = t):  dx = [v − ½·w·∇log p_t] dt + √w dW̄, with the score ∇log p_t = −ε̂/t and
    ε̂ = x + (1 − t)·v, i.e. drift v + ε̂/2. The step onto t = 0 adds no noise."""
    noise = noise or GeneratorNoise(None)
    times = grid.times
    for i in _progress(range(grid.num_steps), progress, "Euler-Maruyama"):
        t, t_next = times[i], times[i + 1]
        v, x0 = _flow_eval(model_fn, x, grid, t)
        if callback is not None:
            callback({"x": x, "i": i, "t": t, "denoised": x0})
        dt = t_next - t
        if t_next > 0:
            eps = grid.process.eps_from_v(x, t, v)
            x = x + dt * (v + 0.5 * eps) + math.sqrt(t * -dt) * noise.like(x)
        else:
            x = x + dt * v
    return x


# ----------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SamplerSpec:
    """A sampler and its default number of steps (the processes say which samplers apply to them)."""

    fn: Callable[..., torch.Tensor]
    default_steps: int
    stochastic: bool
    help: str

    def evaluations(self, num_steps: int) -> int:
        """Model evaluations (function evaluations, before guidance doubles the batch) for ``num_steps``."""
        return 2 * num_steps - 1 if self.fn is sample_heun else num_steps


SAMPLERS: dict[str, SamplerSpec] = {
    "ddpm": SamplerSpec(sample_ddpm, 250, True, "ancestral DDPM on an evenly respaced grid"),
    "ddim": SamplerSpec(sample_ddim, 50, False, "DDIM (eta 0) on DDIM's strided grid"),
    "dpm-solver": SamplerSpec(sample_dpm_solver, 25, False, "DPM-Solver++ 2M (diffusers)"),
    "euler": SamplerSpec(sample_euler, 50, False, "Euler on the flow ODE (1 evaluation per step)"),
    "heun": SamplerSpec(sample_heun, 20, False, "Heun on the flow ODE (2 evaluations per step)"),
    "ab2": SamplerSpec(sample_ab2, 10, False, "two-step Adams–Bashforth on the flow ODE (1 evaluation per step)"),
    "dpm-2m": SamplerSpec(sample_dpm_2m, 10, False, "DPM-Solver++(2M) on the flow ODE (1 evaluation per step)"),
    "euler-maruyama": SamplerSpec(sample_euler_maruyama, 100, True, "Euler–Maruyama on the flow SDE (SiT)"),
}

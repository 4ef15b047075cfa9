"""Flow matching on the linear interpolant between data and Gaussian noise.

Convention: ``x_t = (1 − t)·x0 + t·ε`` with ``t ∈ [0, 1]`` (t = 0 is data, t = 1 is noise), and the
velocity ``dx_t/dt = ε − x0``. The model is trained either to predict that velocity (``prediction="v"``,
SiT / LightningDiT) or to predict x0 (``prediction="x"``, JiT / RiT) while the loss is still taken on
the velocity that x0 implies. Training times come from a uniform or logit-normal draw, optionally
shifted towards noise (SD3's shift). The DiT is conditioned on ``t · FLOW_MODEL_TIME_SCALE`` so its
timestep embedding sees the same range as for the DDPM process (indices 0 … 999).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

from latentdit.diffusion.base import Process
from latentdit.errors import LatentDiTError

# The DiT's timestep input for flow time t is t · FLOW_MODEL_TIME_SCALE (the DDPM process's index range).
FLOW_MODEL_TIME_SCALE = 1000.0

PREDICTIONS = ("v", "x")
TIME_SAMPLINGS = ("uniform", "logit_normal")
LOSS_WEIGHTINGS = ("none", "min_snr")

# With x-prediction the implied velocity is (x_t − x̂0) / t, which blows up as t → 0 (data end);
# the division uses max(t, X_PREDICTION_MIN_T) instead (JiT's clamp, with its value 0.05).
X_PREDICTION_MIN_T = 0.05

# A guidance interval's bounds are compared with float32 model times: this much slack in flow time.
_INTERVAL_SLACK = 1e-6

# "min_snr" loss weighting: Min-SNR-γ with γ = 5, SNR(t) = ((1 − t) / t)².
MIN_SNR_GAMMA = 5.0


def _view(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-sample times [N] shaped [N, 1, …, 1] in the dtype of ``like``."""
    return t.to(device=like.device, dtype=like.dtype).reshape((-1,) + (1,) * (like.ndim - 1))


def _time(t: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor | float:
    """Times for elementwise use with ``like``: a tensor [N] viewed by :func:`_view`, a number as is."""
    return _view(t, like) if torch.is_tensor(t) else float(t)


def _mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=tuple(range(1, x.ndim)))


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's time shift ``t' = s·t / (1 + (s − 1)·t)``: s > 1 moves times towards noise (t = 1);
    s = 1 is the identity; 0 and 1 stay fixed."""
    if shift == 1.0:
        return t
    return shift * t / (1.0 + (shift - 1.0) * t)


def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``x_t = (1 − t)·x0 + t·noise`` for per-sample times ``t`` [N]."""
    tt = _view(t, x0)
    return (1.0 - tt) * x0 + tt * noise


def velocity_from_x0(x_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The velocity ``(x_t − x0) / t`` implied by an x0 estimate, with t clamped below at
    ``X_PREDICTION_MIN_T``."""
    return (x_t - x0) / _view(t, x_t).clamp(min=X_PREDICTION_MIN_T)


def _check_choice(field: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise LatentDiTError(f"diffusion.{field}: expected one of {', '.join(choices)}, got {value!r}")
    return str(value)


def _check_number(field: str, value: Any, *, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or (positive and value <= 0):
        expected = "a finite number > 0" if positive else "a finite number"
        raise LatentDiTError(f"diffusion.{field}: expected {expected}, got {value!r}")
    return float(value)


class FlowProcess(Process):
    """Flow matching on ``x_t = (1 − t)·x0 + t·ε`` (see the module docstring).

    ``prediction``: ``"v"`` (the model outputs ε − x0) or ``"x"`` (the model outputs x0; the loss
    compares the implied velocity (x_t − x̂0)/max(t, 0.05) with (x_t − x0)/max(t, 0.05), as JiT does —
    equal to ε − x0 wherever t ≥ 0.05). ``time_sampling``: ``"uniform"`` on [0, 1) or
    ``"logit_normal"`` (t = sigmoid(m + s·z), z ~ N(0, 1)), then ``time_shift`` is applied.
    ``loss_weighting``: ``"none"`` or ``"min_snr"`` (the per-sample velocity MSE times
    min(SNR, 5)·t², i.e. Min-SNR-5 weighting of the x0 error; SNR(t) = ((1 − t)/t)²).
    There is no learned variance: the model has ``in_channels`` output channels.
    """

    name = "flow"
    samplers = ("euler", "heun", "ab2", "dpm-2m", "euler-maruyama")
    default_sampler = "heun"
    partial_guidance = False
    interval_unit = "two flow times in [0, 1]"
    output_keys = ("prediction",)

    def __init__(self, prediction: str = "v", time_sampling: str = "uniform", logit_mean: float = 0.0,
                 logit_std: float = 1.0, time_shift: float = 1.0, loss_weighting: str = "none") -> None:
        self.prediction = _check_choice("prediction", prediction, PREDICTIONS)
        self.time_sampling = _check_choice("time_sampling", time_sampling, TIME_SAMPLINGS)
        self.logit_mean = _check_number("logit_mean", logit_mean, positive=False)
        self.logit_std = _check_number("logit_std", logit_std, positive=True)
        self.time_shift = _check_number("time_shift", time_shift, positive=True)
        self.loss_weighting = _check_choice("loss_weighting", loss_weighting, LOSS_WEIGHTINGS)

    def __repr__(self) -> str:
        return "FlowProcess(" + ", ".join(f"{k}={v!r}" for k, v in self.metadata().items() if k != "process") + ")"

    def metadata(self) -> dict[str, Any]:
        """The settings as a JSON-able dict (inverse: :func:`latentdit.diffusion.process_from_metadata`)."""
        return {"process": self.name, "prediction": self.prediction, "time_sampling": self.time_sampling,
                "logit_mean": self.logit_mean, "logit_std": self.logit_std, "time_shift": self.time_shift,
                "loss_weighting": self.loss_weighting}

    def out_channels(self, in_channels: int, learn_sigma: bool) -> int:
        """Output channels of a model trained with this process; a learned σ is refused."""
        if learn_sigma:
            raise LatentDiTError("model.learn_sigma=true does not apply to diffusion.process=flow (the flow "
                                 "process has no variance to learn); set model.learn_sigma=false")
        return int(in_channels)

    # ------------------------------------------------------------------ times

    def draw_time(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Training times for ``n`` samples (float32 in [0, 1], on the generator's device)."""
        device = generator.device if generator is not None else torch.device("cpu")
        if self.time_sampling == "uniform":
            t = torch.rand(n, generator=generator, device=device)
        else:
            z = torch.randn(n, generator=generator, device=device)
            t = torch.sigmoid(self.logit_mean + self.logit_std * z)
        return shift_time(t, self.time_shift)

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        """The DiT's timestep input for flow times ``t``."""
        return t * FLOW_MODEL_TIME_SCALE

    # ------------------------------------------------------------------ model output

    def _check_output(self, model_output: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
        if model_output.shape != x_t.shape:
            raise LatentDiTError(f"model output shape {tuple(model_output.shape)} does not fit x_t of shape "
                                 f"{tuple(x_t.shape)}: a flow model predicts exactly the latent channels "
                                 "(no learned σ)")
        return model_output.to(x_t.dtype)

    def velocity_and_x0(self, model_output: torch.Tensor, x_t: torch.Tensor,
                        t: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
        """(velocity, x0 estimate) from a model output at ``x_t`` and flow times ``t`` — for sampling.

        With x-prediction the velocity is (x_t − x̂0)/t without the training loss's clamp, so an Euler
        step onto t = 0 lands exactly on x̂0; the samplers never evaluate the model at t = 0.
        """
        out = self._check_output(model_output, x_t)
        if self.prediction == "v":
            return out, self.x0_from_v(x_t, t, out)
        return self.v_from_x0(x_t, t, out), out

    # ------------------------------------------------------------------ conversions (t: tensor [N] or a number)

    def x0_from_eps(self, x_t: torch.Tensor, t: torch.Tensor | float, eps: torch.Tensor) -> torch.Tensor:
        """x0 = (x_t − t·ε) / (1 − t) (undefined at t = 1)."""
        tt = _time(t, x_t)
        return (x_t - tt * eps) / (1.0 - tt)

    def eps_from_x0(self, x_t: torch.Tensor, t: torch.Tensor | float, x0: torch.Tensor) -> torch.Tensor:
        """ε = (x_t − (1 − t)·x0) / t (undefined at t = 0)."""
        tt = _time(t, x_t)
        return (x_t - (1.0 - tt) * x0) / tt

    def v_from_x0(self, x_t: torch.Tensor, t: torch.Tensor | float, x0: torch.Tensor) -> torch.Tensor:
        """v = ε − x0 = (x_t − x0) / t, t floored at the smallest positive float of the dtype."""
        tt = _time(t, x_t)
        tiny = torch.finfo(x_t.dtype).tiny
        return (x_t - x0) / (tt.clamp(min=tiny) if torch.is_tensor(tt) else max(tt, tiny))

    def x0_from_v(self, x_t: torch.Tensor, t: torch.Tensor | float, v: torch.Tensor) -> torch.Tensor:
        """x0 = x_t − t·v."""
        return x_t - _time(t, x_t) * v

    def eps_from_v(self, x_t: torch.Tensor, t: torch.Tensor | float, v: torch.Tensor) -> torch.Tensor:
        """ε = x_t + (1 − t)·v."""
        return x_t + (1.0 - _time(t, x_t)) * v

    # ------------------------------------------------------------------ sampling

    def sampling_grid(self, sampler: str, num_steps: int, learn_sigma: bool, *, time_shift: float | None = None,
                      ddim_map: str = "ddim") -> "FlowGrid":
        """Every flow sampler walks the same grid: :func:`flow_grid` (``time_shift`` None: the trained shift)."""
        return flow_grid(self, num_steps, self.time_shift if time_shift is None else time_shift)

    def check_num_steps(self, num_steps: Any) -> int:
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
            raise LatentDiTError(f"num_steps (--num-steps) must be an integer >= 1, got {num_steps!r}")
        return num_steps

    def check_guidance_interval(self, lo: float, hi: float) -> tuple[float, float]:
        if not 0.0 <= lo <= hi <= 1.0:
            raise LatentDiTError(f"guidance interval ({lo:g}, {hi:g}) must satisfy 0 ≤ lo ≤ hi ≤ 1 (flow times)")
        return float(lo), float(hi)

    def in_guidance_interval(self, t_model: torch.Tensor, interval: tuple[float, float]) -> bool:
        """Flow times reach the model as float32 t · scale: compared in flow time with float32 slack."""
        lo, hi = interval
        t = float(t_model[0]) / FLOW_MODEL_TIME_SCALE
        return lo - _INTERVAL_SLACK <= t <= hi + _INTERVAL_SLACK

    def sampling_time_shift(self, time_shift: Any) -> float:
        shift = self.time_shift if time_shift is None else time_shift
        if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not math.isfinite(shift) or shift <= 0:
            raise LatentDiTError(f"time_shift (--time-shift) must be a finite number > 0, got {shift!r}")
        return float(shift)

    # ------------------------------------------------------------------ loss

    def loss_weight(self, t: torch.Tensor) -> torch.Tensor:
        """Per-sample weight of the velocity MSE at times ``t`` [N]."""
        if self.loss_weighting == "none":
            return torch.ones_like(t)
        t = t.clamp(min=torch.finfo(t.dtype).tiny)
        snr = ((1.0 - t) / t) ** 2
        return snr.clamp(max=MIN_SNR_GAMMA) * t ** 2

    def training_losses(self, model_fn: Callable[..., torch.Tensor], x0: torch.Tensor, t: torch.Tensor,
                        noise: torch.Tensor | None = None,
                        model_kwargs: Mapping[str, Any] | None = None) -> dict[str, torch.Tensor]:
        """Per-sample losses dict(loss, mse), each [N]; ``model_fn(x_t, t · 1000, **model_kwargs)``."""
        if not torch.is_tensor(t) or not t.is_floating_point() or t.shape != (x0.shape[0],):
            raise LatentDiTError(f"flow times must be a float tensor with one time per sample ({x0.shape[0]}), "
                                 f"got {t.dtype if torch.is_tensor(t) else type(t).__name__} "
                                 f"{tuple(t.shape) if torch.is_tensor(t) else ''}")
        if noise is None:
            noise = torch.randn_like(x0)
        if noise.shape != x0.shape:
            raise LatentDiTError(f"noise shape {tuple(noise.shape)} differs from x0 shape {tuple(x0.shape)}")
        t = t.to(x0.device)
        x_t = interpolate(x0, noise, t)
        out = self._check_output(model_fn(x_t, self.model_time(t), **dict(model_kwargs or {})), x_t)
        if self.prediction == "v":
            target, pred = noise - x0, out
        else:
            target, pred = velocity_from_x0(x_t, x0, t), velocity_from_x0(x_t, out, t)
        mse = _mean_flat((pred - target) ** 2)
        return {"loss": self.loss_weight(t).to(mse.dtype) * mse, "mse": mse}


# ----------------------------------------------------------------------------------------------
# The sampling grid
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FlowGrid:
    """Flow times from 1 (noise) down to 0 (data) and the process that reads the model's output."""

    process: FlowProcess
    times: tuple[float, ...]

    @property
    def num_steps(self) -> int:
        return len(self.times) - 1


def flow_grid(process: FlowProcess, num_steps: int, time_shift: float = 1.0) -> FlowGrid:
    """``num_steps`` equal steps in t from 1 to 0, each time then shifted by ``time_shift``
    (t' = s·t/(1 + (s − 1)·t): s > 1 takes smaller steps near the noise end)."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise LatentDiTError(f"flow sampling needs num_steps >= 1, got {num_steps!r}")
    uniform = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    return FlowGrid(process, tuple(float(t) for t in shift_time(uniform, float(time_shift))))

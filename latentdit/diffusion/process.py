"""The two training processes behind :class:`latentdit.diffusion.base.Process`, chosen by ``diffusion.process``.

``"ddpm"`` is :class:`DDPMProcess`: the discrete Gaussian diffusion of DiT (ε-prediction, learned σ when
the model has 2·C output channels), exactly :class:`GaussianDiffusion`. ``"flow"`` is
:class:`latentdit.diffusion.flow.FlowProcess` (linear interpolant, velocity or x0 prediction).
:func:`build_process` makes one from a ``DiffusionConfig``; its ``metadata()`` is stored in the weights'
metadata under :data:`META_PROCESS` and read back by :func:`process_from_metadata` when sampling.
"""

from __future__ import annotations

from dataclasses import asdict, is_dataclass
from typing import Any, Callable, Mapping

import torch

from latentdit.diffusion.base import Process
from latentdit.diffusion.flow import FlowProcess
from latentdit.diffusion.gaussian import GaussianDiffusion
from latentdit.diffusion.respace import create_diffusion
from latentdit.diffusion.samplers import make_dpm_solver
from latentdit.diffusion.schedules import SCHEDULES
from latentdit.errors import LatentDiTError

PROCESSES = ("ddpm", "flow")
META_PROCESS = "process"   # weights-metadata key holding json(Process.metadata())

_DDPM_FIELDS = ("noise_schedule", "diffusion_steps")
_FLOW_FIELDS = ("prediction", "time_sampling", "logit_mean", "logit_std", "time_shift", "loss_weighting")
_FIELDS = {"ddpm": _DDPM_FIELDS, "flow": _FLOW_FIELDS}


class DDPMProcess(Process):
    """DiT's discrete Gaussian diffusion over ``diffusion_steps`` steps of a named beta schedule.

    Training draws integer timesteps uniformly and delegates the loss to :class:`GaussianDiffusion`:
    a model with 2·C output channels is trained with the hybrid loss (learned σ), one with C channels
    with the ε MSE alone — the same numbers as ``create_diffusion("", schedule, steps, learn_sigma)``.
    Its time is the timestep index of the full schedule, which is also the model's timestep input; its
    velocity is the v of v-prediction, ``v = √ᾱ·ε − √(1 − ᾱ)·x0``.
    """

    name = "ddpm"
    samplers = ("ddpm", "ddim", "dpm-solver")
    default_sampler = "ddpm"
    partial_guidance = True
    interval_unit = "two timestep indices"
    output_keys = ("noise_schedule", "diffusion_steps")

    def __init__(self, noise_schedule: str = "linear", diffusion_steps: int = 1000) -> None:
        if noise_schedule not in SCHEDULES:
            raise LatentDiTError(f"diffusion.noise_schedule: expected one of {', '.join(SCHEDULES)}, "
                                 f"got {noise_schedule!r}")
        if isinstance(diffusion_steps, bool) or not isinstance(diffusion_steps, int) or diffusion_steps < 1:
            raise LatentDiTError(f"diffusion.diffusion_steps: expected an integer >= 1, got {diffusion_steps!r}")
        self.noise_schedule = noise_schedule
        self.diffusion_steps = diffusion_steps
        self._diffusions: dict[bool, GaussianDiffusion] = {}

    def __repr__(self) -> str:
        return f"DDPMProcess(noise_schedule={self.noise_schedule!r}, diffusion_steps={self.diffusion_steps})"

    def metadata(self) -> dict[str, Any]:
        return {"process": self.name, "noise_schedule": self.noise_schedule, "diffusion_steps": self.diffusion_steps}

    def legacy_metadata(self) -> dict[str, Any]:
        return {"noise_schedule": self.noise_schedule, "diffusion_steps": self.diffusion_steps}

    def out_channels(self, in_channels: int, learn_sigma: bool) -> int:
        return 2 * int(in_channels) if learn_sigma else int(in_channels)

    def diffusion(self, learn_sigma: bool, respacing: str = "") -> GaussianDiffusion:
        """The :class:`GaussianDiffusion` for a model with/without learned σ (respaced for sampling)."""
        if respacing:
            return create_diffusion(respacing, self.noise_schedule, self.diffusion_steps, learn_sigma)
        if learn_sigma not in self._diffusions:
            self._diffusions[learn_sigma] = create_diffusion("", self.noise_schedule, self.diffusion_steps,
                                                             learn_sigma)
        return self._diffusions[learn_sigma]

    def draw_time(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Integer timesteps uniform on 0 … diffusion_steps−1 (one ``randint`` draw)."""
        return torch.randint(0, self.diffusion_steps, (n,), generator=generator,
                             device=generator.device if generator is not None else "cpu")

    def training_losses(self, model_fn: Callable[..., torch.Tensor], x0: torch.Tensor, t: torch.Tensor,
                        noise: torch.Tensor | None = None,
                        model_kwargs: Mapping[str, Any] | None = None) -> dict[str, torch.Tensor]:
        """Per-sample dict(loss, mse, vb) as :meth:`GaussianDiffusion.training_losses`."""
        base = self.diffusion(learn_sigma=False)
        t, noise, x_t = base.noised_input(x0, t, noise)
        out = model_fn(x_t, base.model_timesteps(t), **dict(model_kwargs or {}))
        learned = out.ndim > 1 and out.shape[1] == 2 * x0.shape[1]
        return self.diffusion(learn_sigma=learned).losses_from_output(out, x0, x_t, t, noise)


    # ------------------------------------------------------------------ time and targets

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        """The model is conditioned on the timestep index itself."""
        return t

    def x0_from_eps(self, x_t: torch.Tensor, t: torch.Tensor | int, eps: torch.Tensor) -> torch.Tensor:
        return self.diffusion(learn_sigma=False).predict_x0_from_eps(x_t, t, eps)

    def eps_from_x0(self, x_t: torch.Tensor, t: torch.Tensor | int, x0: torch.Tensor) -> torch.Tensor:
        return self.diffusion(learn_sigma=False).predict_eps_from_x0(x_t, t, x0)

    def v_from_x0(self, x_t: torch.Tensor, t: torch.Tensor | int, x0: torch.Tensor) -> torch.Tensor:
        """v = √ᾱ·ε − √(1 − ᾱ)·x0 with ε implied by x0, i.e. (√ᾱ·x_t − x0) / √(1 − ᾱ)."""
        base = self.diffusion(learn_sigma=False)
        return ((base.gather("sqrt_alphas_cumprod", t, x_t) * x_t - x0)
                / base.gather("sqrt_one_minus_alphas_cumprod", t, x_t))

    def x0_from_v(self, x_t: torch.Tensor, t: torch.Tensor | int, v: torch.Tensor) -> torch.Tensor:
        """x0 = √ᾱ·x_t − √(1 − ᾱ)·v."""
        base = self.diffusion(learn_sigma=False)
        return (base.gather("sqrt_alphas_cumprod", t, x_t) * x_t
                - base.gather("sqrt_one_minus_alphas_cumprod", t, x_t) * v)

    # ------------------------------------------------------------------ sampling

    def sampling_grid(self, sampler: str, num_steps: int, learn_sigma: bool, *, time_shift: float | None = None,
                      ddim_map: str = "ddim") -> Any:
        """``dpm-solver``: a DPM-Solver++ scheduler on this schedule; ``ddpm`` / ``ddim``: the respaced
        :class:`GaussianDiffusion` (``ddim`` with ``ddim_map="ddim"``: DDIM's strided ``ddimN`` map)."""
        if sampler == "dpm-solver":
            return make_dpm_solver(num_steps, self.noise_schedule, self.diffusion_steps)
        strided = sampler == "ddim" and ddim_map == "ddim"
        try:
            return self.diffusion(learn_sigma, f"ddim{num_steps}" if strided else str(num_steps))
        except LatentDiTError as e:
            if not strided:
                raise
            raise LatentDiTError(f"{e}; choose another --num-steps or pass --ddim-map even") from None

    def check_num_steps(self, num_steps: Any) -> int:
        most = self.diffusion_steps
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or not 1 <= num_steps <= most:
            raise LatentDiTError(f"num_steps (--num-steps) must be between 1 and {most}, got {num_steps!r}")
        return num_steps

    def check_guidance_interval(self, lo: float, hi: float) -> tuple[int, int]:
        if not (float(lo).is_integer() and float(hi).is_integer()):
            raise LatentDiTError(f"guidance interval must be LO,HI ({self.interval_unit}), got ({lo:g}, {hi:g})")
        last = self.diffusion_steps - 1
        if not 0 <= lo <= hi <= last:
            raise LatentDiTError(f"guidance interval ({lo:g}, {hi:g}) must satisfy 0 ≤ lo ≤ hi ≤ {last}")
        return int(lo), int(hi)

    def in_guidance_interval(self, t_model: torch.Tensor, interval: tuple[float, float]) -> bool:
        lo, hi = interval
        return lo <= int(t_model[0]) <= hi

    def sampling_time_shift(self, time_shift: Any) -> None:
        if time_shift is not None:
            raise LatentDiTError("time_shift (--time-shift) applies to flow models only")
        return None


#: The processes by their ``diffusion.process`` name.
PROCESS_TYPES: dict[str, type[Process]] = {"ddpm": DDPMProcess, "flow": FlowProcess}



def _fields(cfg: Any) -> dict[str, Any]:
    if is_dataclass(cfg) and not isinstance(cfg, type):
        return asdict(cfg)
    if isinstance(cfg, Mapping):
        return dict(cfg)
    raise LatentDiTError(f"diffusion settings must be a DiffusionConfig or a dict, got {type(cfg).__name__}")


def build_process(diffusion_cfg: Any) -> Process:
    """The process described by a ``DiffusionConfig`` (or an equal dict); fields of the other process
    and sampling fields (``sample_steps``) are ignored. A missing ``process`` means ``"ddpm"``."""
    fields = _fields(diffusion_cfg)
    name = fields.get("process", "ddpm")
    if name not in PROCESS_TYPES:
        raise LatentDiTError(f"diffusion.process: expected one of {', '.join(PROCESSES)}, got {name!r}")
    return PROCESS_TYPES[name](**{k: fields[k] for k in _FIELDS[name] if k in fields})


def process_from_metadata(meta: Mapping[str, Any]) -> Process:
    """Inverse of ``Process.metadata()``: every key must belong to the named process."""
    if not isinstance(meta, Mapping):
        raise LatentDiTError(f"metadata {META_PROCESS!r} must be a JSON object, got {type(meta).__name__}")
    name = meta.get("process", "ddpm")
    known = _FIELDS.get(name)
    if known is not None:
        unknown = sorted(set(meta) - set(known) - {"process"})
        if unknown:
            raise LatentDiTError(f"metadata {META_PROCESS!r} of a {name} process has unknown field(s) "
                                 f"{', '.join(unknown)}; expected only {', '.join(known)}")
    return build_process(meta)

"""The training process a model is trained with, chosen by ``diffusion.process``.

Both processes answer the same questions, so the training loop never needs to know which one it runs:

* ``draw_time(n, generator)`` — training times for a batch;
* ``training_losses(model_fn, x0, t, noise, model_kwargs)`` — per-sample losses (key ``"loss"``);
* ``metadata()`` — the settings as a JSON-able dict; stored in the weights' metadata under
  :data:`META_PROCESS` and read back by :func:`process_from_metadata` when sampling;
* ``out_channels(in_channels, learn_sigma)`` — the model's output channels under this process.

``"ddpm"`` is :class:`DDPMProcess`: the discrete Gaussian diffusion of DiT (ε-prediction, learned σ when
the model has 2·C output channels), exactly :class:`GaussianDiffusion`. ``"flow"`` is
:class:`latentdit.diffusion.flow.FlowProcess` (linear interpolant, velocity or x0 prediction).
"""

from __future__ import annotations

from dataclasses import asdict, is_dataclass
from typing import Any, Callable, Mapping, Union

import torch

from latentdit.diffusion.flow import FlowProcess
from latentdit.diffusion.gaussian import GaussianDiffusion
from latentdit.diffusion.respace import create_diffusion
from latentdit.diffusion.schedules import SCHEDULES
from latentdit.errors import LatentDiTError

PROCESSES = ("ddpm", "flow")
META_PROCESS = "process"   # weights-metadata key holding json(Process.metadata())

_DDPM_FIELDS = ("noise_schedule", "diffusion_steps")
_FLOW_FIELDS = ("prediction", "time_sampling", "logit_mean", "logit_std", "time_shift", "loss_weighting")


class DDPMProcess:
    """DiT's discrete Gaussian diffusion over ``diffusion_steps`` steps of a named beta schedule.

    Training draws integer timesteps uniformly and delegates the loss to :class:`GaussianDiffusion`:
    a model with 2·C output channels is trained with the hybrid loss (learned σ), one with C channels
    with the ε MSE alone — the same numbers as ``create_diffusion("", schedule, steps, learn_sigma)``.
    """

    name = "ddpm"
    default_sampler = "ddpm"

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


Process = Union[DDPMProcess, FlowProcess]


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
    if name == "ddpm":
        return DDPMProcess(**{k: fields[k] for k in _DDPM_FIELDS if k in fields})
    if name == "flow":
        return FlowProcess(**{k: fields[k] for k in _FLOW_FIELDS if k in fields})
    raise LatentDiTError(f"diffusion.process: expected one of {', '.join(PROCESSES)}, got {name!r}")


def process_from_metadata(meta: Mapping[str, Any]) -> Process:
    """Inverse of ``Process.metadata()``: every key must belong to the named process."""
    if not isinstance(meta, Mapping):
        raise LatentDiTError(f"metadata {META_PROCESS!r} must be a JSON object, got {type(meta).__name__}")
    name = meta.get("process", "ddpm")
    known = {"ddpm": _DDPM_FIELDS, "flow": _FLOW_FIELDS}.get(name)
    if known is not None:
        unknown = sorted(set(meta) - set(known) - {"process"})
        if unknown:
            raise LatentDiTError(f"metadata {META_PROCESS!r} of a {name} process has unknown field(s) "
                                 f"{', '.join(unknown)}; expected only {', '.join(known)}")
    return build_process(meta)

"""The model function the samplers call: the DiT with classifier-free guidance, optionally only inside
a guidance interval and only on the first latent channels, or with autoguidance by a weaker model
(:mod:`latentdit.sampling.autoguidance`) inside its own interval, and with Internal Guidance
(:mod:`latentdit.sampling.internal`) inside its own interval, under autocast on CUDA."""

from __future__ import annotations

import contextlib
from typing import Callable

import torch

from latentdit.diffusion import Process
from latentdit.errors import LatentDiTError
from latentdit.models.guidance import guided_forward
from latentdit.sampling.autoguidance import autoguided_forward
from latentdit.sampling.internal import InternallyGuided

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def make_model_fn(model: torch.nn.Module, y: torch.Tensor, *, cfg_scale: float,
                  guided_channels: int | None = None, guide_at: Callable[[torch.Tensor], bool] | None = None,
                  dtype: torch.dtype | None = None, guide_model: torch.nn.Module | None = None,
                  guide_scale: float = 1.0, autoguide_at: Callable[[torch.Tensor], bool] | None = None,
                  internal_scale: float = 1.0, internal_at: Callable[[torch.Tensor], bool] | None = None) -> ModelFn:
    """``model_fn(x, t_model)`` for the samplers: guided where ``guide_at(t_model)`` holds (everywhere
    when None), plain conditional elsewhere. cfg_scale 1 never runs the unconditional half. With a
    ``guide_model`` and ``guide_scale`` other than 1: autoguided where ``autoguide_at(t_model)`` holds
    (everywhere when None) instead (the two guidances are exclusive). ``internal_scale`` other than 1:
    the model's own output is internally guided where ``internal_at(t_model)`` holds (everywhere when
    None), before classifier-free guidance. Output in float32."""
    if guide_model is not None and guide_scale != 1.0 and cfg_scale != 1.0:
        raise LatentDiTError("autoguidance replaces classifier-free guidance: use cfg scale 1 with a guide model")

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = t.to(x.device).reshape(-1)
        if t.numel() == 1:
            t = t.expand(x.shape[0])
        guide = cfg_scale != 1.0 and (guide_at is None or guide_at(t))
        autoguide = (guide_model is not None and guide_scale != 1.0
                     and (autoguide_at is None or autoguide_at(t)))
        internal = internal_scale != 1.0 and (internal_at is None or internal_at(t))
        net = InternallyGuided(model, internal_scale) if internal else model
        with _autocast(x.device, dtype):
            if autoguide:
                out = autoguided_forward(model, guide_model, x, t, y, guide_scale)
            elif guide:
                out = guided_forward(net, x, t, y, cfg_scale, guided_channels=guided_channels)
            else:
                out = net(x, t, y)
        return out.float()

    return model_fn


def guidance_test(process: Process,
                  interval: tuple[float, float] | None) -> Callable[[torch.Tensor], bool] | None:
    """The guidance-interval test on the model's timestep input (None: guide everywhere)."""
    if interval is None:
        return None
    return lambda t_model: process.in_guidance_interval(t_model, interval)

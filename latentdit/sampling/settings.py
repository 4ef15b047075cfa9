"""Sampler settings: :class:`SamplerSettings` as a user gives them, :class:`ResolvedSettings` once
checked against the model's process and latent channels (and a guide model, for autoguidance), with
every default filled in."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

from latentdit.diffusion import PROCESS_TYPES, Process
from latentdit.diffusion.samplers import SAMPLERS as SAMPLER_SPECS
from latentdit.errors import LatentDiTError
from latentdit.models.guidance import check_cfg_scale
from latentdit.sampling.autoguidance import Guide, check_guide_process

SAMPLERS = tuple(SAMPLER_SPECS)
DEFAULT_NUM_STEPS = {name: spec.default_steps for name, spec in SAMPLER_SPECS.items()}
DDIM_MAPS = ("ddim", "even")


@dataclass(frozen=True)
class SamplerSettings:
    """How to sample, as given: independent of the model and the noise. :meth:`resolved` fills the
    defaults for a process and validates every field (a :class:`LatentDiTError` names the field and its
    flag).

    ``sampler``: a name of :data:`SAMPLERS`; None → the process's default (ddpm: ``ddpm``, flow: ``heun``).
    ``num_steps``: None → the sampler's default (:data:`DEFAULT_NUM_STEPS`).
    ``guidance_interval``: (LO, HI), guide only at times LO..HI inclusive, in the process's own time
    (ddpm: original timestep indices, flow: flow times in [0, 1]); None → every step.
    ``guided_channels``: ddpm only, guide the first k latent channels (3: the released DiT sampling
    code); None → all. ``time_shift``: flow only, shift of the step grid (t' = s·t/(1 + (s − 1)·t));
    None → the shift the model was trained with. ``ddim_map``: ``"ddim"`` (DDIM's strided timesteps
    0, s, 2s, …, as the ADM / DiT code samples with ``ddimN``) or ``"even"`` (the evenly rounded
    respacing DDPM uses).
    ``guide_scale``: autoguidance weight w (``guide + w · (main − guide)``, see
    :mod:`latentdit.sampling.autoguidance`); needs a guide model at :meth:`resolved`, and a cfg scale
    of 1 (autoguidance replaces classifier-free guidance). ``guide_interval``: (LO, HI) as
    ``guidance_interval``, where the guide applies; None → every step.
    ``internal_scale``: Internal Guidance weight w (``internal + w · (final − internal)``, see
    :mod:`latentdit.sampling.internal`; 1 = off); needs a model with an internal head, combines with a cfg
    scale. ``internal_interval``: (LO, HI) as ``guidance_interval``, where it applies; None → every step.
    """

    sampler: str | None = None
    num_steps: int | None = None
    cfg_scale: float = 1.0
    guidance_interval: Sequence[float] | None = None
    guided_channels: int | None = None
    time_shift: float | None = None
    ddim_map: str = "ddim"
    guide_scale: float = 1.0
    guide_interval: Sequence[float] | None = None
    internal_scale: float = 1.0
    internal_interval: Sequence[float] | None = None

    def resolved(self, process: Process, in_channels: int, guide: Guide | None = None,
                 internal_head: bool = False) -> "ResolvedSettings":
        """The settings with defaults filled in for ``process`` and a model of ``in_channels`` latent
        channels, after validating every field; ``guide``: the weaker model for autoguidance;
        ``internal_head``: whether the model has one (Internal Guidance needs it)."""
        sampler = self.sampler if self.sampler is not None else process.default_sampler
        if sampler not in SAMPLER_SPECS:
            raise LatentDiTError(f"unknown sampler {sampler!r} (--sampler); choose one of {', '.join(SAMPLERS)}")
        if sampler not in process.samplers:
            owner = next(name for name, kind in PROCESS_TYPES.items() if sampler in kind.samplers)
            fitting = [n for n in SAMPLERS if n in process.samplers]
            raise LatentDiTError(f"sampler {sampler!r} (--sampler) samples {owner} models, but this model "
                                 f"was trained with the {process.name} process; choose one of {', '.join(fitting)}")
        steps = process.check_num_steps(SAMPLER_SPECS[sampler].default_steps if self.num_steps is None
                                        else self.num_steps)
        cfg_scale = check_cfg_scale(self.cfg_scale)
        interval = _guidance_interval(self.guidance_interval, process)
        guided = _guided_channels(self.guided_channels, in_channels)
        if guided is not None and not process.partial_guidance:
            raise LatentDiTError("guided channels (--guided-channels) other than 'all' apply to ddpm models only "
                                 "(the released DiT's behaviour); flow models are guided on every channel")
        time_shift = process.sampling_time_shift(self.time_shift)
        if self.ddim_map not in DDIM_MAPS:
            raise LatentDiTError(f"ddim_map (--ddim-map) must be one of {', '.join(DDIM_MAPS)}, got {self.ddim_map!r}")
        guide_scale, guide_interval = self._autoguidance(process, guide, cfg_scale)
        internal_scale, internal_interval = self._internal_guidance(process, internal_head, guide)
        return ResolvedSettings(process=process, sampler=sampler, num_steps=steps, cfg_scale=cfg_scale,
                                guidance_interval=interval, guided_channels=guided, time_shift=time_shift,
                                ddim_map=self.ddim_map, guide=guide, guide_scale=guide_scale,
                                guide_interval=guide_interval, internal_scale=internal_scale,
                                internal_interval=internal_interval)

    def _internal_guidance(self, process: Process, internal_head: bool,
                           guide: Guide | None) -> tuple[float, tuple[float, float] | None]:
        scale = _weight(self.internal_scale, "internal guidance scale (--internal-scale)")
        if scale == 1.0:
            if self.internal_interval is not None:
                raise LatentDiTError("--internal-interval applies to internal guidance only: give --internal-scale w")
            return scale, None
        if not internal_head:
            raise LatentDiTError("internal guidance (--internal-scale) needs a model trained with an internal head "
                                 "(model.internal_block); this one has none")
        if guide is not None:
            raise LatentDiTError("internal guidance (--internal-scale) and autoguidance (--guide) are exclusive: "
                                 "choose one")
        return scale, _guidance_interval(self.internal_interval, process, "--internal-interval")

    def _autoguidance(self, process: Process, guide: Guide | None,
                      cfg_scale: float) -> tuple[float, tuple[float, float] | None]:
        scale = _weight(self.guide_scale, "guide scale (--guide-scale)")
        if guide is None:
            if scale != 1.0 or self.guide_interval is not None:
                flag = "--guide-scale" if scale != 1.0 else "--guide-interval"
                raise LatentDiTError(f"{flag} applies to autoguidance only: give the guide model's weights (--guide)")
            return scale, None
        if scale == 1.0:
            raise LatentDiTError("a guide model (--guide) has no effect at guide scale 1: give --guide-scale w "
                                 "(e.g. 2; the output is guide + w · (main − guide))")
        if cfg_scale != 1.0:
            raise LatentDiTError(f"autoguidance (--guide) replaces classifier-free guidance, so the cfg scale must "
                                 f"be 1 with a guide model, got --cfg-scale {cfg_scale:g}; add --cfg-scale 1")
        check_guide_process(guide, process)
        return scale, _guidance_interval(self.guide_interval, process, "--guide-interval")


@dataclass(frozen=True)
class ResolvedSettings:
    """Settings valid for ``process`` (see :class:`SamplerSettings`; made by :meth:`SamplerSettings.resolved`):
    ``guidance_interval`` is None or (lo, hi) in the process's canonical types, ``guided_channels`` None
    (every channel) or k below the model's latent channels, ``time_shift`` None for a DDPM process."""

    process: Process
    sampler: str
    num_steps: int
    cfg_scale: float
    guidance_interval: tuple[float, float] | None
    guided_channels: int | None
    time_shift: float | None
    ddim_map: str
    guide: Guide | None = None
    guide_scale: float = 1.0
    guide_interval: tuple[float, float] | None = None
    internal_scale: float = 1.0
    internal_interval: tuple[float, float] | None = None

    def describe(self) -> str:
        """A short label, e.g. ``heun-20, cfg 4``, ``heun-20, autoguidance 2`` or ``heun-20, cfg 1.5, internal
        guidance 1.4``."""
        if self.guide is not None:
            return f"{self.sampler}-{self.num_steps}, autoguidance {self.guide_scale:g}"
        internal = f", internal guidance {self.internal_scale:g}" if self.internal_scale != 1.0 else ""
        return f"{self.sampler}-{self.num_steps}, cfg {self.cfg_scale:g}{internal}"

    def grid(self, learn_sigma: bool) -> Any:
        """The time grid the sampler walks (see :meth:`latentdit.diffusion.base.Process.sampling_grid`)."""
        return self.process.sampling_grid(self.sampler, self.num_steps, learn_sigma, time_shift=self.time_shift,
                                          ddim_map=self.ddim_map)


def _weight(value: Any, what: str) -> float:
    try:
        scale = float(value)
    except (TypeError, ValueError):
        scale = math.nan
    if isinstance(value, bool) or not math.isfinite(scale) or scale < 0:
        raise LatentDiTError(f"{what} must be a finite number >= 0, got {value!r}")
    return scale


def _guidance_interval(value: Any, process: Process, flag: str = "") -> tuple[float, float] | None:
    if value is None:
        return None
    unit = process.interval_unit
    what = f"guidance interval ({flag})" if flag else "guidance interval"
    if isinstance(value, str) or not isinstance(value, Sequence) or len(value) != 2:
        raise LatentDiTError(f"{what} must be LO,HI ({unit}), got {value!r}")
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise LatentDiTError(f"{what} must be LO,HI ({unit}), got {value!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise LatentDiTError(f"{what} must be LO,HI ({unit}), got {value!r}")
    try:
        return process.check_guidance_interval(lo, hi)
    except LatentDiTError as e:
        if not flag:
            raise
        raise LatentDiTError(f"{flag}: {e}") from None


def _guided_channels(value: Any, in_channels: int) -> int | None:
    """None → None (guide every channel); k in 1..in_channels → k, or None when k is every channel."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= in_channels:
        raise LatentDiTError(f"guided channels must be between 1 and {in_channels} (the model's latent "
                             f"channels), got {value!r}")
    return None if value == in_channels else value

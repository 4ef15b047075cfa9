"""The interface every training process implements, so that training and sampling never ask which
process they run.

A process defines a forward corruption ``x_t = a(t)·x0 + s(t)·ε`` over its own time ``t`` (the DDPM
process: integer timestep indices of its full schedule; the flow process: float times in [0, 1]).
It owns:

* training: :meth:`Process.draw_time`, :meth:`Process.training_losses`;
* the model: :meth:`Process.model_time` (the DiT's timestep input for a time), :meth:`Process.out_channels`;
* the conversions between the model's possible targets at a state ``x_t``: x0, ε and the velocity v
  (:meth:`Process.x0_from_eps`, :meth:`Process.eps_from_x0`, :meth:`Process.v_from_x0`,
  :meth:`Process.x0_from_v`, and :meth:`Process.eps_from_v` built from them);
* sampling: the samplers that apply (:attr:`Process.samplers`, :attr:`Process.default_sampler`), the
  time grid a sampler walks (:meth:`Process.sampling_grid`), and the checks of the sampler settings
  that depend on the process (steps, guidance interval, grid shift, partial guidance);
* persistence: :meth:`Process.metadata` (JSON-able, stored in the weights' metadata).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable, Mapping

import torch


class Process(ABC):
    """A training process (see the module docstring). ``name`` is the value of ``diffusion.process``."""

    name: str
    #: sampler names (keys of :data:`latentdit.diffusion.samplers.SAMPLERS`) that apply, and the default one
    samplers: tuple[str, ...]
    default_sampler: str
    #: whether guidance may be restricted to the first k latent channels (the released DiT's behaviour)
    partial_guidance: bool
    #: what a guidance interval's bounds are, for messages
    interval_unit: str
    #: the :meth:`metadata` keys that fix what the model's output means at a given input (two models
    #: whose processes agree on them predict the same quantity, so one can guide the other)
    output_keys: tuple[str, ...]

    # ------------------------------------------------------------------ persistence and model shape

    @abstractmethod
    def metadata(self) -> dict[str, Any]:
        """The settings as a JSON-able dict with a ``"process"`` key (inverse:
        :func:`latentdit.diffusion.process_from_metadata`)."""

    def legacy_metadata(self) -> dict[str, Any] | None:
        """Settings for the older ``latentdit_diffusion`` weights-metadata key, which describes DDPM
        settings only (None: the process has none)."""
        return None

    @abstractmethod
    def out_channels(self, in_channels: int, learn_sigma: bool) -> int:
        """Output channels of a model trained with this process (refuses what the process cannot train)."""

    # ------------------------------------------------------------------ training

    @abstractmethod
    def draw_time(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Training times for ``n`` samples, on the generator's device."""

    @abstractmethod
    def training_losses(self, model_fn: Callable[..., torch.Tensor], x0: torch.Tensor, t: torch.Tensor,
                        noise: torch.Tensor | None = None,
                        model_kwargs: Mapping[str, Any] | None = None) -> dict[str, torch.Tensor]:
        """Per-sample losses (key ``"loss"``, each [N]); ``model_fn(x_t, model_time(t), **model_kwargs)``."""

    # ------------------------------------------------------------------ time and targets

    @abstractmethod
    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        """The DiT's timestep input for process times ``t``."""

    @abstractmethod
    def x0_from_eps(self, x_t: torch.Tensor, t: Any, eps: torch.Tensor) -> torch.Tensor:
        """The data estimate given the noise in ``x_t`` at times ``t``."""

    @abstractmethod
    def eps_from_x0(self, x_t: torch.Tensor, t: Any, x0: torch.Tensor) -> torch.Tensor:
        """The noise estimate given the data in ``x_t`` at times ``t``."""

    @abstractmethod
    def v_from_x0(self, x_t: torch.Tensor, t: Any, x0: torch.Tensor) -> torch.Tensor:
        """The velocity (the process's v target) given the data in ``x_t`` at times ``t``."""

    @abstractmethod
    def x0_from_v(self, x_t: torch.Tensor, t: Any, v: torch.Tensor) -> torch.Tensor:
        """The data estimate given the velocity at ``x_t`` and times ``t``."""

    def eps_from_v(self, x_t: torch.Tensor, t: Any, v: torch.Tensor) -> torch.Tensor:
        """The noise estimate given the velocity at ``x_t`` and times ``t``."""
        return self.eps_from_x0(x_t, t, self.x0_from_v(x_t, t, v))

    # ------------------------------------------------------------------ sampling

    @abstractmethod
    def sampling_grid(self, sampler: str, num_steps: int, learn_sigma: bool, *, time_shift: float | None = None,
                      ddim_map: str = "ddim") -> Any:
        """The ``grid`` argument of ``sampler`` (see :mod:`latentdit.diffusion.samplers`) for ``num_steps``."""

    @abstractmethod
    def check_num_steps(self, num_steps: Any) -> int:
        """``num_steps`` validated for sampling (a :class:`LatentDiTError` says the allowed range)."""

    @abstractmethod
    def check_guidance_interval(self, lo: float, hi: float) -> tuple[float, float]:
        """A guidance interval (inclusive, in process time) validated and in its canonical types."""

    @abstractmethod
    def in_guidance_interval(self, t_model: torch.Tensor, interval: tuple[float, float]) -> bool:
        """Whether the model's timestep input ``t_model`` (same for the whole batch) lies in ``interval``."""

    @abstractmethod
    def sampling_time_shift(self, time_shift: Any) -> float | None:
        """The shift of the sampling grid: ``time_shift`` validated, None filled with the process's default."""

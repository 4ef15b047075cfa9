"""Autoguidance (Karras et al. 2024, "Guiding a diffusion model with a bad version of itself"): the main
model is guided by a weaker model of the same task — an earlier checkpoint of the same run, or a
smaller model trained the same way — instead of by its own unconditional branch::

    D_w(x, t, y) = D_guide(x, t, y) + w · (D_main(x, t, y) − D_guide(x, t, y))

Both models see the same labels, so the guide needs no null class row. The combination applies to the
model's prediction channels (eps for ddpm, velocity or x0 for flow); learned-σ channels come from the
main model. A guide must share the main model's process as far as the output's meaning goes
(:attr:`latentdit.diffusion.base.Process.output_keys`), its latent shape and its class count.

Autoguidance replaces classifier-free guidance rather than adding to it: settings with a guide and a
cfg scale other than 1 are refused (see :meth:`latentdit.sampling.settings.SamplerSettings.resolved`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from latentdit.diffusion import Process
from latentdit.errors import LatentDiTError
from latentdit.models.guidance import unwrap_model


@dataclass(frozen=True)
class Guide:
    """The weaker model, the process it was trained with and, when loaded from a file, its path."""

    model: nn.Module
    process: Process
    path: Path | None = None

    @property
    def source(self) -> str:
        """The guide as messages name it."""
        return f"guide {self.path}" if self.path is not None else "the guide model"


def check_guide_process(guide: Guide, process: Process) -> None:
    """Refuse a guide whose process does not predict what the main model's does."""
    mine, theirs = process.metadata(), guide.process.metadata()
    if guide.process.name != process.name:
        raise LatentDiTError(f"{guide.source} (--guide) was trained with the {guide.process.name} process, the "
                             f"main model with {process.name}; a guide must be trained with the same process")
    differ = [f"{k} {theirs.get(k)!r} (main model: {mine.get(k)!r})" for k in process.output_keys
              if theirs.get(k) != mine.get(k)]
    if differ:
        raise LatentDiTError(f"{guide.source} (--guide) predicts another quantity than the main model: "
                             f"{', '.join(differ)}")


def check_guide_model(model: nn.Module, guide: Guide) -> None:
    """Refuse a guide of another latent shape or class count than the main ``model``."""
    main, weak = unwrap_model(model), unwrap_model(guide.model)
    for name in ("in_channels", "input_size", "num_classes"):
        if int(getattr(weak, name)) != int(getattr(main, name)):
            raise LatentDiTError(f"{guide.source} (--guide) has {name} {getattr(weak, name)}, the main model "
                                 f"{getattr(main, name)}; a guide must work on the same latents and classes")


def autoguided_forward(model: nn.Module, guide: nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                       scale: float) -> torch.Tensor:
    """``guide + scale · (main − guide)`` on the first ``in_channels`` output channels, shaped like
    ``model(x, t, y)`` (its remaining, learned-σ channels come from the main model)."""
    k = unwrap_model(model).in_channels
    main, weak = model(x, t, y), guide(x, t, y)
    guided = weak[:, :k] + scale * (main[:, :k] - weak[:, :k])
    return torch.cat([guided, main[:, k:]], dim=1)

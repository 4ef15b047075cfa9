"""Internal Guidance (Zhou et al. 2025, arXiv 2512.24176) at sampling time.

A DiT trained with an internal head (``model.internal_block``, see :mod:`latentdit.models.dit`) predicts
twice in one forward pass: from an early block (a weaker model of the same task) and from the last block.
Sampling extrapolates from the weak prediction through the final one,

    D_w(x, t, y) = D_internal(x, t, y) + w · (D_final(x, t, y) − D_internal(x, t, y)),

on the latent channels (a learned σ comes from the final head), inside its own interval of times. Like
autoguidance it sharpens without pulling towards the class template, and it costs no extra forward pass.
With classifier-free guidance both halves (conditional and unconditional) are internally guided first
and then combined by the cfg scale, as in the paper.
"""

from __future__ import annotations

import torch
from torch import nn

from latentdit.models.guidance import unwrap_model


def has_internal_head(model: nn.Module) -> bool:
    return getattr(unwrap_model(model), "internal_layer", None) is not None


class InternallyGuided(nn.Module):
    """``model`` with its output replaced by the internally guided one (scale ``w``); ``module`` is the
    model, so :func:`~latentdit.models.guidance.unwrap_model` and classifier-free guidance see through it."""

    def __init__(self, model: nn.Module, scale: float):
        super().__init__()
        self.module = model
        self.scale = float(scale)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        final, extras = self.module(x, t, y, return_internal=True)
        k = unwrap_model(self.module).in_channels
        weak = extras.internal[:, :k]
        return torch.cat([weak + self.scale * (final[:, :k] - weak), final[:, k:]], dim=1)

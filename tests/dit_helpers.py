"""Helpers shared by the model tests (no tests here)."""

from __future__ import annotations

import torch


def randomize(module, std: float = 0.05, seed: int = 0):
    """Perturb every trainable weight: adaLN and final layers are no longer zero, so outputs can differ."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * std)
    return module.eval()

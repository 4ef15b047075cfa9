"""The optimizer of both trainers: AdamW, with no weight decay on norms, biases and embeddings."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


def no_decay_parameters(model: nn.Module) -> set[int]:
    """``id``s of the parameters weight decay must not touch: every 1-D parameter (biases, norm scales
    and shifts) and the tables of ``nn.Embedding`` modules."""
    out = {id(p) for p in model.parameters() if p.ndim <= 1}
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            out.add(id(module.weight))
    return out


def build_adamw(model: nn.Module, lr: float, *, weight_decay: float = 0.0, betas: Sequence[float] = (0.9, 0.999),
                eps: float = 1e-8, device: torch.device | str = "cpu") -> torch.optim.AdamW:
    """AdamW over the trainable parameters of ``model``, the fused kernel on CPU and CUDA (one pass over
    all parameters instead of a Python loop per tensor).

    With ``weight_decay > 0`` the parameters form two groups: those of :func:`no_decay_parameters`
    (decay 0) after the others; without weight decay there is one group.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    params: list | list[dict] = trainable
    if weight_decay > 0:
        exempt = no_decay_parameters(model)
        params = [{"params": [p for p in trainable if id(p) not in exempt], "weight_decay": weight_decay},
                  {"params": [p for p in trainable if id(p) in exempt], "weight_decay": 0.0}]
    return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                             fused=torch.device(device).type in ("cpu", "cuda"))

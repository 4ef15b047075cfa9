"""Exponential moving average of a model's trainable weights.

Only parameters with ``requires_grad`` are averaged; frozen parameters (the DiT's fixed sin-cos
position embedding) and buffers are copied from the live model when the EMA weights are exported,
so an exported state dict is a complete model state dict.

With a sharded model (``train.fsdp``) every shadow is a shard like its parameter, the update stays
local, and :meth:`EMA.state_dict` / :meth:`EMA.load_state_dict` gather and cut whole tensors: all
processes call them.
"""

from __future__ import annotations

from typing import Callable, Mapping

import numpy as np
import torch
from torch import nn

from latentdit.errors import LatentDiTError
from latentdit.training.sharding import full_tensor, like_shard


def warmup_decay(decay: float, num_updates: int) -> float:
    """``min(decay, (1 + n) / (10 + n))`` after ``n`` updates: a short memory early in training, so a
    short run's EMA is not dominated by the (random or zero) initial weights."""
    return min(decay, (1.0 + num_updates) / (10.0 + num_updates))


def power_gamma(sigma_rel: float) -> float:
    """The exponent ``γ`` of a power-function EMA (EDM2, Karras et al. 2024) whose averaging profile
    ``p(τ) ∝ τ^γ`` over the run so far, ``τ ∈ [0, 1]``, has standard deviation ``sigma_rel``:
    ``sigma_rel² = (γ+1) / ((γ+2)² (γ+3))``, i.e. the largest real root of
    ``σ²γ³ + 7σ²γ² + (16σ² − 1)γ + 12σ² − 1 = 0``."""
    if not 0.0 < float(sigma_rel) < 12.0 ** -0.5:  # γ → 0 is the uniform profile, whose std is 1/√12
        raise LatentDiTError(f"train.ema_sigma_rel: expected 0 (off) or a number in (0, {1 / 12 ** 0.5:.4f}), "
                             f"got {sigma_rel!r}")
    s2 = float(sigma_rel) ** 2
    roots = np.roots([s2, 7 * s2, 16 * s2 - 1, 12 * s2 - 1])
    return float(max(r.real for r in roots if abs(r.imag) < 1e-9))


def power_decay(gamma: float, num_updates: int) -> float:
    """Decay of update number ``num_updates`` (from 1) of a power-function EMA: ``(1 − 1/n)^(γ+1)``. After
    ``N`` updates, sample ``τ`` weighs ``(τ^(γ+1) − (τ−1)^(γ+1)) / N^(γ+1)``: the profile ``∝ τ^γ`` stretched
    over the whole run, so the average's length is a fixed fraction of training so far."""
    n = int(num_updates)
    if n < 1:
        raise LatentDiTError(f"power EMA updates are counted from 1, got {num_updates}")
    return (1.0 - 1.0 / n) ** (gamma + 1.0)


def decay_rule(decay: float, warmup: bool = False, sigma_rel: float = 0.0) -> Callable[[int], float]:
    """The decay of update number ``n`` (from 1; the trainer's step) of a run's EMA: with ``sigma_rel > 0``
    the power EMA's :func:`power_decay` (``decay`` and ``warmup`` unused); else ``decay``, through
    :func:`warmup_decay` when ``warmup``. Refuses settings out of range (messages name the ``train`` field)."""
    if not (isinstance(decay, (int, float)) and 0.0 <= decay <= 1.0):
        raise LatentDiTError(f"train.ema_decay: expected a number in [0, 1], got {decay!r}")
    if sigma_rel != 0:
        gamma = power_gamma(sigma_rel)
        return lambda n: power_decay(gamma, n)
    if warmup:
        return lambda n: warmup_decay(decay, n - 1)
    return lambda n: float(decay)


class EMA:
    """``shadow = decay * shadow + (1 - decay) * param`` for every trainable parameter, in fp32.

    :meth:`update` takes the decay of the update, or ``decay``; :attr:`decay_at` gives update ``n``'s
    decay under ``warmup`` / ``sigma_rel`` (see :func:`decay_rule`)."""

    def __init__(self, model: nn.Module, decay: float, *, warmup: bool = False, sigma_rel: float = 0.0) -> None:
        self.decay_at = decay_rule(decay, warmup, sigma_rel)
        self.decay = float(decay)
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        params = dict(model.named_parameters())
        self.shadow: dict[str, torch.Tensor] = {
            n: params[n].detach().to(torch.float32).clone() for n in self.names
        }

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float | None = None) -> None:
        """One EMA step towards the current parameters of ``model``."""
        d = self.decay if decay is None else float(decay)
        params = dict(model.named_parameters())
        shadow = [self.shadow[n] for n in self.names]
        current = [params[n].detach() for n in self.names]
        if any(c.dtype != torch.float32 for c in current):
            current = [c.float() for c in current]
        # shadow += (1 - d) * (param - shadow), i.e. shadow = d * shadow + (1 - d) * param
        torch._foreach_lerp_(shadow, current, 1.0 - d)

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """A full model state dict with the averaged weights in place of the trainable ones (whole
        tensors, also for a sharded model)."""
        out = {}
        for name, value in model.state_dict().items():
            source = self.shadow[name] if name in self.shadow else value.detach()
            out[name] = full_tensor(source).to(value.dtype)
        return out

    def load_state_dict(self, state: Mapping[str, torch.Tensor], source: str = "EMA weights") -> None:
        """Take the averaged weights from a full state dict written by :meth:`state_dict`."""
        missing = [n for n in self.names if n not in state]
        if missing:
            raise LatentDiTError(f"{source} lack {len(missing)} trainable weights, e.g. {missing[:3]}")
        for n in self.names:
            if state[n].shape != self.shadow[n].shape:
                raise LatentDiTError(f"{source}: '{n}' has shape {tuple(state[n].shape)}, "
                                     f"expected {tuple(self.shadow[n].shape)}")
            self.shadow[n].copy_(like_shard(state[n].to(torch.float32), self.shadow[n]))

    def to(self, device: torch.device | str) -> "EMA":
        self.shadow = {n: t.to(device) for n, t in self.shadow.items()}
        return self

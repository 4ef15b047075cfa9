"""The DiT's fixed (unlearned) embeddings: sinusoidal timestep features, the 2-D sin-cos position table
and the 2-D rotary table."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.layers import build_rotary_pos_embed

from latentdit.errors import LatentDiTError

TIMESTEP_FREQ_DIM = 256
TIMESTEP_MAX_PERIOD = 10000
ROPE_THETA = 10000.0


def timestep_embedding(t: torch.Tensor, dim: int = TIMESTEP_FREQ_DIM,
                       max_period: int = TIMESTEP_MAX_PERIOD) -> torch.Tensor:
    """Sinusoidal features ``[cos(t·f_i), sin(t·f_i)]`` with ``f_i = max_period^(-i/half)``; t may be fractional."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(exponent / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """1D sin-cos table ``[sin(p·ω), cos(p·ω)]``, ``ω_i = 10000^(-i/(dim/2))``, computed in float64."""
    omega = torch.arange(dim // 2, dtype=torch.float64, device=pos.device) / (dim / 2.0)
    omega = 1.0 / 10000 ** omega
    out = pos.reshape(-1).to(torch.float64)[:, None] * omega[None]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_2d(dim: int, grid_size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """2D sin-cos table ``[grid_size², dim]`` in float64, tokens row-major.

    The first half of each vector encodes the column index, the second half the row index (the
    MAE/DiT convention, which diffusers' ``get_2d_sincos_pos_embed`` shares).
    """
    if dim % 4:
        raise LatentDiTError(f"hidden_size must be divisible by 4 for the 2D sin-cos position embedding, got {dim}")
    coords = torch.arange(grid_size, dtype=torch.float64, device=device)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    return torch.cat([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], dim=1)


def rope_2d(grid_size: int, head_dim: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Rotary table ``[grid_size², 2·head_dim]`` (sin then cos, pairs of channels interleaved) for
    row-major tokens: the first half of a head's channels rotates with the token's row, the second with
    its column, at frequencies ``ROPE_THETA^(-i/(head_dim/4))``; integer grid coordinates."""
    sin, cos = build_rotary_pos_embed([grid_size, grid_size], dim=head_dim, in_pixels=False,
                                      temperature=ROPE_THETA, device=device)
    return torch.cat([sin, cos], dim=-1)

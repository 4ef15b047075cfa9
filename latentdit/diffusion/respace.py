"""Timestep respacing: sample with a subset of the training timesteps.

A respaced diffusion keeps the original alphas_cumprod at the kept indices and recomputes its betas
from them, so each of its steps jumps between two kept noise levels. Its ``timestep_map`` sends a
respaced index back to the original index, which is what the model is always conditioned on.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from latentdit.diffusion.gaussian import GaussianDiffusion
from latentdit.diffusion.schedules import get_betas
from latentdit.errors import LatentDiTError


def _parse_count(text: str, spec: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise LatentDiTError(f"timestep respacing {spec!r}: {text!r} is not an integer step count; expected e.g. "
                             f"'250', 'ddim50' or '10,15,20'") from None
    if value < 1:
        raise LatentDiTError(f"timestep respacing {spec!r}: step counts must be positive, got {value}")
    return value


def space_timesteps(num_timesteps: int, section_counts: str | Sequence[int]) -> list[int]:
    """Sorted original indices to keep out of ``num_timesteps``.

    ``section_counts``:
      * ``"ddimN"`` — the integer stride s giving exactly N indices ``0, s, 2s, …`` (DDIM's spacing);
      * ``"N"`` or ``"a,b,c"`` (or a list of ints) — the range is cut into equal sections (the first
        ones one longer when it does not divide) and each section gets its count of indices, evenly
        strided from the section's first to its last index (rounded).
    """
    if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, (int, np.integer)) or num_timesteps < 1:
        raise LatentDiTError(f"num_timesteps must be a positive integer, got {num_timesteps!r}")
    total = int(num_timesteps)
    if isinstance(section_counts, str):
        spec = section_counts.strip()
        if spec.startswith("ddim"):
            wanted = _parse_count(spec[len("ddim"):], section_counts)
            for stride in range(1, total + 1):
                kept = list(range(0, total, stride))
                if len(kept) == wanted:
                    return kept
                if len(kept) < wanted:
                    break
            raise LatentDiTError(f"timestep respacing {section_counts!r}: no integer stride gives exactly "
                                 f"{wanted} steps out of {total}")
        if not spec:
            raise LatentDiTError("timestep respacing is empty; expected e.g. '250', 'ddim50' or '10,15,20'")
        counts = [_parse_count(part.strip(), section_counts) for part in spec.split(",")]
    else:
        counts = [_parse_count(str(c), str(list(section_counts))) for c in section_counts]
        if not counts:
            raise LatentDiTError("timestep respacing: the list of section counts is empty")

    base, extra = divmod(total, len(counts))
    if base == 0:
        raise LatentDiTError(f"timestep respacing {section_counts!r}: {len(counts)} sections do not fit in "
                             f"{total} steps")
    kept: list[int] = []
    start = 0
    for i, count in enumerate(counts):
        size = base + (1 if i < extra else 0)
        if count > size:
            raise LatentDiTError(f"timestep respacing {section_counts!r}: cannot take {count} steps from a "
                                 f"section of {size}")
        stride = (size - 1) / (count - 1) if count > 1 else 1.0
        kept.extend(start + round(j * stride) for j in range(count))
        start += size
    return sorted(set(kept))


def respace_betas(betas: Sequence[float] | np.ndarray, use_timesteps: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Betas of the chain that visits only ``use_timesteps`` (same alphas_cumprod there), and the map
    from new index to original index."""
    betas = np.asarray(betas, dtype=np.float64)
    keep = np.unique(np.asarray(list(use_timesteps), dtype=np.int64))
    if keep.size == 0 or keep[0] < 0 or keep[-1] >= betas.shape[0]:
        raise LatentDiTError(f"timesteps to keep must be non-empty indices in [0, {betas.shape[0]})")
    alphas_cumprod = np.cumprod(1.0 - betas)[keep]
    previous = np.append(1.0, alphas_cumprod[:-1])
    return 1.0 - alphas_cumprod / previous, keep


def create_diffusion(timestep_respacing: str | Sequence[int] | None = "", noise_schedule: str = "linear",
                     diffusion_steps: int = 1000, learn_sigma: bool = True,
                     sigma_small: bool = False) -> GaussianDiffusion:
    """The diffusion used for training (``timestep_respacing`` empty) or sampling (e.g. "250", "ddim50").

    Variance: learned range when ``learn_sigma``; else fixed small (posterior) if ``sigma_small``, fixed
    large (beta) otherwise.
    """
    betas = get_betas(noise_schedule, diffusion_steps)
    if learn_sigma:
        var_type = "learned_range"
    else:
        var_type = "fixed_small" if sigma_small else "fixed_large"
    if timestep_respacing is None or (isinstance(timestep_respacing, str) and not timestep_respacing.strip()):
        return GaussianDiffusion(betas, model_var_type=var_type)
    keep = space_timesteps(diffusion_steps, timestep_respacing)
    new_betas, timestep_map = respace_betas(betas, keep)
    return GaussianDiffusion(new_betas, model_var_type=var_type, timestep_map=timestep_map)

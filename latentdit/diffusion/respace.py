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


def _parse_count(text: str, spec: str, minimum: int = 1) -> int:
    try:
        value = int(text)
    except ValueError:
        raise LatentDiTError(f"timestep respacing {spec!r}: {text!r} is not an integer step count; expected e.g. "
                             f"'250', 'ddim50' or '10,15,20'") from None
    if value < minimum:
        raise LatentDiTError(f"timestep respacing {spec!r}: step counts must be at least {minimum}, got {value}")
    return value


def space_timesteps(num_timesteps: int, section_counts: str | Sequence[int]) -> list[int]:
    """Sorted original indices to keep out of ``num_timesteps``, the released DiT/ADM way.

    ``section_counts``:
      * ``"ddimN"`` — ``0, s, 2s, …`` for the smallest integer stride s in 1 … num_timesteps-1 that
        gives exactly N indices; refused when there is none (so ``"ddim1"`` is refused: it would need
        the stride num_timesteps, which the released code never tries);
      * ``"N"`` or ``"a,b,c"`` (or a list of ints) — the range is cut into equal sections (the first
        ones one longer when it does not divide) and each section gets its count of indices: starting
        at the section's first index, a float position advances by (size-1)/(count-1) per index and
        each index is that position rounded (Python's round, halves to even). The position is
        accumulated, not recomputed as j·stride, because that is what the released code does and the
        two round differently for some counts. A section may take 0 indices; at least one overall.
    """
    if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, (int, np.integer)) or num_timesteps < 1:
        raise LatentDiTError(f"num_timesteps must be a positive integer, got {num_timesteps!r}")
    total = int(num_timesteps)
    if isinstance(section_counts, str):
        spec = section_counts.strip()
        if spec.startswith("ddim"):
            wanted = _parse_count(spec[len("ddim"):], section_counts)
            for stride in range(1, total):
                if len(range(0, total, stride)) == wanted:
                    return list(range(0, total, stride))
            raise LatentDiTError(f"timestep respacing {section_counts!r}: no integer stride from 1 to {total - 1} "
                                 f"gives exactly {wanted} steps out of {total}")
        if not spec:
            raise LatentDiTError("timestep respacing is empty; expected e.g. '250', 'ddim50' or '10,15,20'")
        counts = [_parse_count(part.strip(), section_counts, minimum=0) for part in spec.split(",")]
    else:
        counts = [_parse_count(str(c), str(list(section_counts)), minimum=0) for c in section_counts]
        if not counts:
            raise LatentDiTError("timestep respacing: the list of section counts is empty")
    if sum(counts) == 0:
        raise LatentDiTError(f"timestep respacing {section_counts!r}: keeps no step; give at least one positive count")

    base, extra = divmod(total, len(counts))
    kept: list[int] = []
    start = 0
    for i, count in enumerate(counts):
        size = base + (1 if i < extra else 0)
        if count > size:
            raise LatentDiTError(f"timestep respacing {section_counts!r}: cannot take {count} steps from "
                                 f"section {i + 1} of {len(counts)}, which has {size} of the {total} steps")
        stride = (size - 1) / (count - 1) if count > 1 else 1.0
        position = 0.0
        for _ in range(count):
            kept.append(start + round(position))
            position += stride
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

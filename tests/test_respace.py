"""Timestep respacing: the released DiT/ADM spacing rules, respaced diffusions keep alphas_cumprod."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from latentdit.diffusion import create_diffusion, get_betas, respace_betas, space_timesteps
from latentdit.errors import LatentDiTError


# ----------------------------------------------------------------------------- respacing


def _released_spacing(num_timesteps: int, counts: list[int]) -> list[int] | None:
    """The released DiT/ADM section spacing written out: equal sections (the first ``num_timesteps %
    len(counts)`` one longer); in each, positions 0, s, s+s, … accumulated in floating point with
    s = (size-1)/(count-1), rounded with Python's round and offset by the section start. None where the
    released code raises (a section asked for more steps than it has)."""
    sizes = [num_timesteps // len(counts) + (i < num_timesteps % len(counts)) for i in range(len(counts))]
    starts = [0] + list(itertools.accumulate(sizes))[:-1]
    kept: set[int] = set()
    for start, size, count in zip(starts, sizes, counts):
        if count > size:
            return None
        stride = (size - 1) / (count - 1) if count > 1 else 1
        positions = itertools.accumulate([0.0] + [stride] * max(count - 1, 0)) if count else []
        kept.update(start + round(p) for p in positions)
    return sorted(kept)


def _released_ddim_spacing(num_timesteps: int, count: int) -> list[int] | None:
    """Strides 1 … num_timesteps-1 tried in order; the first giving ``count`` indices wins, else None."""
    hits = [list(range(0, num_timesteps, s)) for s in range(1, num_timesteps)
            if len(range(0, num_timesteps, s)) == count]
    return hits[0] if hits else None


def test_space_timesteps_single_section_every_count() -> None:
    differs_from_rounded_multiples = 0
    for count in range(1, 1001):
        kept = space_timesteps(1000, str(count))
        assert kept == _released_spacing(1000, [count]), count
        differs_from_rounded_multiples += kept != sorted({round(j * (999 / max(count - 1, 1))) for j in range(count)})
    assert differs_from_rounded_multiples > 0  # the accumulated position is not round(j·stride) for some counts
    assert space_timesteps(1000, "250")[:3] == [0, 4, 8] and space_timesteps(1000, "1000") == list(range(1000))


@pytest.mark.parametrize("spec", ["10,15,20", "3,2", "1,1,1,1", "50,50", "0,10", "25,0,25", "7,13,999", "333,333,334",
                                  "1,2,3,4,5,6,7,8,9,10", "100,1", "4,4,4,4,4,4,4"])
@pytest.mark.parametrize("total", [10, 300, 1000, 4000])
def test_space_timesteps_sections_match_released(spec: str, total: int) -> None:
    counts = [int(c) for c in spec.split(",")]
    expected = _released_spacing(total, counts)
    if expected is None:
        with pytest.raises(LatentDiTError, match=r"respacing .*cannot take \d+ steps from section \d+ of \d+"):
            space_timesteps(total, spec)
    else:
        assert space_timesteps(total, spec) == expected
        assert space_timesteps(total, counts) == expected


def test_space_timesteps_more_sections_than_steps() -> None:
    # 5 sections of 2 steps: sizes 1, 1, 0, 0, 0 — empty sections are fine while they ask for nothing
    assert space_timesteps(2, "1,1,0,0,0") == [0, 1]
    with pytest.raises(LatentDiTError, match="section 3 of 3, which has 0 of the 2 steps"):
        space_timesteps(2, "1,1,1")


@pytest.mark.parametrize("total", [1, 2, 10, 1000])
def test_space_timesteps_ddim_every_count(total: int) -> None:
    for count in range(1, 1002):
        expected = _released_ddim_spacing(total, count)
        if expected is None:
            with pytest.raises(LatentDiTError, match=f"ddim{count}.*no integer stride"):
                space_timesteps(total, f"ddim{count}")
        else:
            assert space_timesteps(total, f"ddim{count}") == expected
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    with pytest.raises(LatentDiTError, match="no integer stride from 1 to 999 gives exactly 1 steps"):
        space_timesteps(1000, "ddim1")


@pytest.mark.parametrize("spec", ["", "abc", "ddim", "ddim0", "ddim6", "ddimx", "0", "0,0", "5,x", "-3", "5,-1",
                                  "600,600", "ddim2000", "ddim1"])
def test_space_timesteps_bad_spec(spec: str) -> None:
    total = 10 if spec == "ddim6" else 1000
    with pytest.raises(LatentDiTError, match="respacing"):
        space_timesteps(total, spec)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_respaced_diffusion_keeps_alphas_cumprod(schedule: str) -> None:
    full = create_diffusion(noise_schedule=schedule)
    for spec in ["250", "ddim50", "10,15,20"]:
        spaced = create_diffusion(spec, noise_schedule=schedule)
        kept = space_timesteps(1000, spec)
        assert spaced.num_timesteps == len(kept) and spaced.timestep_map.tolist() == kept
        np.testing.assert_allclose(spaced.alphas_cumprod, full.alphas_cumprod[kept], rtol=1e-12, atol=1e-15)
        assert spaced.model_timesteps(torch.tensor([0, len(kept) - 1])).tolist() == [kept[0], kept[-1]]
    betas, tmap = respace_betas(get_betas(schedule), range(1000))
    np.testing.assert_allclose(betas, get_betas(schedule), rtol=1e-12, atol=1e-15)


def test_create_diffusion_variance_types() -> None:
    assert create_diffusion().model_var_type == "learned_range"
    assert create_diffusion(learn_sigma=False).model_var_type == "fixed_large"
    assert create_diffusion(learn_sigma=False, sigma_small=True).model_var_type == "fixed_small"
    assert create_diffusion(diffusion_steps=100).num_timesteps == 100

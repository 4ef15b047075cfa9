"""Noise schedules against diffusers' arrays; bad schedule input."""

from __future__ import annotations

import numpy as np
import pytest

from latentdit.diffusion import GaussianDiffusion, get_betas
from latentdit.errors import LatentDiTError

try:
    from diffusion_helpers import ddpm_scheduler
except ImportError:  # run as the tests package
    from tests.diffusion_helpers import ddpm_scheduler


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_schedule_arrays_match_diffusers(schedule: str) -> None:
    betas = get_betas(schedule, 1000)
    assert betas.dtype == np.float64 and betas.shape == (1000,)
    ref = ddpm_scheduler(schedule, "fixed_small")
    np.testing.assert_allclose(betas, ref.betas.double().numpy(), rtol=1e-6, atol=1e-9)
    diffusion = GaussianDiffusion(betas, "fixed_small")
    np.testing.assert_allclose(diffusion.alphas_cumprod, ref.alphas_cumprod.double().numpy(), rtol=2e-4, atol=1e-8)


def test_linear_schedule_scales_with_step_count() -> None:
    betas = get_betas("linear", 500)
    assert betas.shape == (500,)
    assert betas[0] == pytest.approx(2e-4) and betas[-1] == pytest.approx(0.04)
    assert get_betas("linear")[0] == pytest.approx(1e-4) and get_betas("linear")[-1] == pytest.approx(0.02)


def test_cosine_schedule_is_capped() -> None:
    betas = get_betas("cosine", 1000)
    assert betas.max() == pytest.approx(0.999)
    assert np.all(np.diff(betas) > -1e-12)


@pytest.mark.parametrize("bad", [("sqrt", 1000), ("linear", 0), ("cosine", 2.5)])
def test_schedule_bad_input(bad: tuple) -> None:
    with pytest.raises(LatentDiTError, match="schedule|num_timesteps"):
        get_betas(*bad)

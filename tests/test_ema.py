"""latentdit.training.ema: the exponential and the power-function (EDM2) moving averages."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from latentdit.errors import LatentDiTError
from latentdit.training.ema import EMA, power_decay, power_gamma, warmup_decay


@pytest.mark.parametrize("sigma_rel", [0.01, 0.05, 0.1, 0.2])
def test_power_gamma_gives_a_profile_of_that_width(sigma_rel):
    gamma = power_gamma(sigma_rel)
    # p(τ) = (γ+1) τ^γ on [0, 1]: mean (γ+1)/(γ+2), second moment (γ+1)/(γ+3)
    mean, second = (gamma + 1) / (gamma + 2), (gamma + 1) / (gamma + 3)
    assert np.sqrt(second - mean ** 2) == pytest.approx(sigma_rel, rel=1e-9)


def test_power_gamma_known_values_and_range():
    # the two snapshot lengths EDM2 stores: σ_rel 0.05 ↔ γ 16.97, σ_rel 0.10 ↔ γ 6.94
    assert power_gamma(0.05) == pytest.approx(16.97, abs=0.01)
    assert power_gamma(0.10) == pytest.approx(6.94, abs=0.01)
    assert power_gamma(0.2) < power_gamma(0.1) < power_gamma(0.05)
    for bad in (0.0, -0.1, 0.3):
        with pytest.raises(LatentDiTError, match="train.ema_sigma_rel"):
            power_gamma(bad)


def test_power_ema_weights_every_update_as_the_profile_says():
    gamma, n = power_gamma(0.1), 50
    values = torch.linspace(-1.0, 3.0, n, dtype=torch.float64) ** 2
    model = nn.Linear(1, 1, bias=False)
    ema = EMA(model, 0.0)
    for step in range(1, n + 1):
        with torch.no_grad():
            model.weight.fill_(values[step - 1].item())
        ema.update(model, power_decay(gamma, step))
    tau = np.arange(1, n + 1, dtype=np.float64)
    weights = (tau ** (gamma + 1) - (tau - 1) ** (gamma + 1)) / n ** (gamma + 1)
    assert weights.sum() == pytest.approx(1.0, rel=1e-12)
    expected = float(np.dot(weights, values.numpy()))
    assert ema.shadow["weight"].item() == pytest.approx(expected, rel=1e-6)  # the shadow is fp32
    assert power_decay(gamma, 1) == 0.0  # the first update copies the weights
    with pytest.raises(LatentDiTError, match="counted from 1"):
        power_decay(gamma, 0)


def test_warmup_decay_is_short_early_and_capped():
    assert warmup_decay(0.9999, 0) == pytest.approx(0.1)
    assert warmup_decay(0.9999, 10 ** 9) == 0.9999

"""The EMA of the DiT trainer (latentdit.training.ema): exponential, with warm-up, and power-function (EDM2)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from latentdit.errors import LatentDiTError
from latentdit.training import EMA
from latentdit.training.ema import power_decay, power_gamma


# ----------------------------------------------------------------------------------------------
# EMA and checkpoint manager
# ----------------------------------------------------------------------------------------------

def test_ema_warmup_decay():
    from latentdit.training.ema import warmup_decay

    assert warmup_decay(0.9999, 0) == pytest.approx(0.1)
    assert warmup_decay(0.9999, 90) == pytest.approx(91 / 100)
    assert warmup_decay(0.99, 10_000) == 0.99  # capped by the configured decay
    assert all(warmup_decay(0.9999, n) <= warmup_decay(0.9999, n + 1) for n in range(0, 5000, 7))


def test_ema_math_and_frozen_params():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    model.register_parameter("frozen", torch.nn.Parameter(torch.ones(2), requires_grad=False))
    ema = EMA(model, decay=0.75)
    assert ema.names == ["weight", "bias"]
    w0 = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
        model.frozen.mul_(5)
    ema.update(model)
    torch.testing.assert_close(ema.shadow["weight"], 0.75 * w0 + 0.25 * (w0 + 1.0))
    ema.update(model, decay=0.0)
    torch.testing.assert_close(ema.shadow["weight"], w0 + 1.0)
    sd = ema.state_dict(model)
    assert set(sd) == {"weight", "bias", "frozen"}
    torch.testing.assert_close(sd["frozen"], torch.full((2,), 5.0))  # frozen weights come from the model
    other = EMA(model, 0.5)
    other.load_state_dict(sd)
    torch.testing.assert_close(other.shadow["weight"], ema.shadow["weight"])
    with pytest.raises(LatentDiTError):
        EMA(model, 1.5)


@pytest.mark.parametrize("sigma_rel", [0.01, 0.05, 0.1, 0.2])
def test_power_gamma_gives_a_profile_of_that_width(sigma_rel):
    gamma = power_gamma(sigma_rel)
    # p(τ) = (γ+1) τ^γ on [0, 1]: mean (γ+1)/(γ+2), second moment (γ+1)/(γ+3)
    mean, second = (gamma + 1) / (gamma + 2), (gamma + 1) / (gamma + 3)
    assert np.sqrt(second - mean ** 2) == pytest.approx(sigma_rel, rel=1e-7)


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
    assert weights.sum() == pytest.approx(1.0, rel=1e-7)
    expected = float(np.dot(weights, values.numpy()))
    assert ema.shadow["weight"].item() == pytest.approx(expected, rel=1e-6)  # the shadow is fp32
    assert power_decay(gamma, 1) == 0.0  # the first update copies the weights
    with pytest.raises(LatentDiTError, match="counted from 1"):
        power_decay(gamma, 0)

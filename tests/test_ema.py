"""The EMA of the DiT trainer (latentdit.training.ema)."""

from __future__ import annotations


import pytest
import torch

from latentdit.errors import LatentDiTError
from latentdit.training import EMA


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

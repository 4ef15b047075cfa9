"""Flow matching: the forward process, targets and losses against closed forms; training times; the sampling grid."""

from __future__ import annotations


import pytest
import torch

from latentdit.diffusion import FLOW_MODEL_TIME_SCALE, FlowProcess
from latentdit.diffusion.flow import X_PREDICTION_MIN_T, flow_grid, shift_time
from latentdit.errors import LatentDiTError

SHAPE = (6, 4, 3, 3)


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    noise = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    t = torch.tensor([0.0, 0.01, 0.2, 0.5, 0.9, 1.0], dtype=torch.float64)
    return x0, noise, t


# ----------------------------------------------------------------------------------------------
# Flow: forward process and targets
# ----------------------------------------------------------------------------------------------

def test_flow_model_sees_the_interpolant_and_scaled_time():
    x0, noise, t = _batch()
    seen = {}

    def model_fn(x_t, t_model, y):
        seen.update(x_t=x_t, t_model=t_model, y=y)
        return torch.zeros_like(x_t)

    FlowProcess().training_losses(model_fn, x0, t, noise, {"y": "labels"})
    for i, ti in enumerate(t.tolist()):
        torch.testing.assert_close(seen["x_t"][i], (1 - ti) * x0[i] + ti * noise[i])
    torch.testing.assert_close(seen["t_model"], t * 1000.0)
    assert FLOW_MODEL_TIME_SCALE == 1000.0 and seen["y"] == "labels"


def test_v_prediction_loss_is_the_velocity_mse():
    x0, noise, t = _batch()
    exact = FlowProcess(prediction="v").training_losses(lambda x, s: noise - x0, x0, t, noise)
    assert torch.all(exact["loss"] == 0)
    offset = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    off = FlowProcess(prediction="v").training_losses(lambda x, s: noise - x0 + offset, x0, t, noise)
    torch.testing.assert_close(off["loss"], (offset ** 2).mean(dim=(1, 2, 3)))


def test_x_prediction_loss_is_the_implied_velocity_error_with_clamped_time():
    x0, noise, t = _batch()
    exact = FlowProcess(prediction="x").training_losses(lambda x, s: x0, x0, t, noise)
    assert torch.all(exact["loss"] == 0)
    offset = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    got = FlowProcess(prediction="x").training_losses(lambda x, s: x0 + offset, x0, t, noise)["loss"]
    # v̂ − v = (x_t − x̂0)/t − (x_t − x0)/t = −offset / max(t, 0.05)
    expected = (offset ** 2).mean(dim=(1, 2, 3)) / t.clamp(min=X_PREDICTION_MIN_T) ** 2
    torch.testing.assert_close(got, expected)
    assert X_PREDICTION_MIN_T == 0.05


def test_velocity_and_x0_from_either_prediction_agree_with_the_interpolant():
    x0, noise, t = _batch()
    t = t.clamp(min=0.1)  # where the x-prediction velocity is not clamped
    x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise
    for prediction, output in (("v", noise - x0), ("x", x0)):
        v, x0_hat = FlowProcess(prediction=prediction).velocity_and_x0(output, x_t, t)
        torch.testing.assert_close(v, noise - x0)
        torch.testing.assert_close(x0_hat, x0)


def test_min_snr_weighting_closed_form():
    x0, noise, t = _batch()
    offset = torch.ones(SHAPE, dtype=torch.float64)
    p = FlowProcess(loss_weighting="min_snr")
    got = p.training_losses(lambda x, s: noise - x0 + offset, x0, t, noise)
    expected = torch.tensor([min(((1 - s) / s) ** 2, 5.0) * s * s if s > 0 else 0.0 for s in t.tolist()],
                            dtype=torch.float64)
    torch.testing.assert_close(got["loss"], expected)
    torch.testing.assert_close(got["mse"], torch.ones(6, dtype=torch.float64))


def test_flow_refuses_learned_sigma_and_wrong_output_shapes():
    p = FlowProcess()
    assert p.out_channels(4, learn_sigma=False) == 4
    with pytest.raises(LatentDiTError, match="learn_sigma"):
        p.out_channels(4, learn_sigma=True)
    x0, noise, t = _batch()
    with pytest.raises(LatentDiTError, match="no learned σ"):
        p.training_losses(lambda x, s: torch.cat([x, x], 1), x0, t, noise)
    with pytest.raises(LatentDiTError, match="float tensor"):
        p.training_losses(lambda x, s: x, x0, torch.zeros(6, dtype=torch.long), noise)


# ----------------------------------------------------------------------------------------------
# Flow: training times
# ----------------------------------------------------------------------------------------------

def test_shift_formula():
    t = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=torch.float64)
    torch.testing.assert_close(shift_time(t, 3.0), torch.tensor([0.0, 0.5, 0.75, 1.0], dtype=torch.float64))
    assert torch.equal(shift_time(t, 1.0), t)
    # shifting by s then by 1/s gives the identity (t' = s t / (1 + (s−1) t) is a Möbius map)
    torch.testing.assert_close(shift_time(shift_time(t, 3.0), 1 / 3), t)


def test_uniform_time_draw_statistics():
    t = FlowProcess().draw_time(200_000, torch.Generator().manual_seed(0))
    assert t.dtype == torch.float32 and t.shape == (200_000,) and 0 <= t.min() and t.max() < 1
    assert abs(t.mean().item() - 0.5) < 0.005
    assert abs(t.var().item() - 1 / 12) < 0.002


def test_logit_normal_time_draw_statistics():
    p = FlowProcess(time_sampling="logit_normal", logit_mean=-0.4, logit_std=1.3)
    t = p.draw_time(200_000, torch.Generator().manual_seed(1)).double()
    logit = torch.log(t / (1 - t))
    assert abs(logit.mean().item() + 0.4) < 0.02
    assert abs(logit.std().item() - 1.3) < 0.02


def test_shifted_draw_follows_the_shifted_distribution():
    s = 3.0
    t = FlowProcess(time_shift=s).draw_time(200_000, torch.Generator().manual_seed(2)).double()
    # t' = shift(u), u uniform: P(t' <= q) = shift_inverse(q) = q / (s − (s − 1) q)
    for q in (0.2, 0.5, 0.8):
        assert abs((t <= q).double().mean().item() - q / (s - (s - 1) * q)) < 0.005


def test_draw_time_is_reproducible_under_a_seed():
    p = FlowProcess(time_sampling="logit_normal")
    a = p.draw_time(8, torch.Generator().manual_seed(5))
    b = p.draw_time(8, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------
# The sampling grid
# ----------------------------------------------------------------------------------------------

def test_flow_grid_runs_from_noise_to_data_with_the_shift():
    grid = flow_grid(FlowProcess(), 4, time_shift=3.0)
    expected = [3 * t / (1 + 2 * t) for t in (1.0, 0.75, 0.5, 0.25, 0.0)]
    assert grid.times == pytest.approx(expected) and grid.times[0] == 1.0 and grid.times[-1] == 0.0
    assert grid.num_steps == 4
    assert flow_grid(FlowProcess(), 2).times == (1.0, 0.5, 0.0)
    with pytest.raises(LatentDiTError, match="num_steps >= 1"):
        flow_grid(FlowProcess(), 0)

"""The training processes: flow matching against closed forms, DDPM identical to GaussianDiffusion."""

from __future__ import annotations

import json
import math

import pytest
import torch

from latentdit.diffusion import (
    FLOW_MODEL_TIME_SCALE,
    DDPMProcess,
    FlowProcess,
    build_process,
    create_diffusion,
    process_from_metadata,
)
from latentdit.diffusion.flow import X_PREDICTION_MIN_T, shift_time
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
# DDPM: the process is exactly GaussianDiffusion
# ----------------------------------------------------------------------------------------------

def test_ddpm_draw_time_is_todays_randint_draw():
    g1, g2 = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    t = DDPMProcess(diffusion_steps=1000).draw_time(64, g1)
    assert torch.equal(t, torch.randint(0, 1000, (64,), generator=g2))
    # the generator has advanced the same way, so later draws (noise, drop mask) are unchanged too
    assert torch.equal(torch.randn(3, generator=g1), torch.randn(3, generator=g2))


@pytest.mark.parametrize("learn_sigma", [True, False])
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_ddpm_losses_equal_gaussian_diffusion(learn_sigma, schedule):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(5, 4, 3, 3, generator=g)
    noise = torch.randn(5, 4, 3, 3, generator=g)
    t = torch.tensor([0, 1, 17, 500, 999])
    weight = torch.randn(8 if learn_sigma else 4, 4, generator=g)

    def model_fn(x, ts, y):
        return torch.einsum("oc,nchw->nohw", weight, x) * (1 + ts.view(-1, 1, 1, 1) / 1000) + y

    ref = create_diffusion("", schedule, 1000, learn_sigma).training_losses(model_fn, x0, t, noise, {"y": 0.1})
    got = DDPMProcess(schedule, 1000).training_losses(model_fn, x0, t, noise, {"y": 0.1})
    assert set(got) == set(ref)
    for k in ref:
        assert torch.equal(got[k], ref[k]), k
    assert DDPMProcess().out_channels(4, learn_sigma) == (8 if learn_sigma else 4)


# ----------------------------------------------------------------------------------------------
# Building from config and metadata
# ----------------------------------------------------------------------------------------------

def test_metadata_round_trips_through_json():
    for p in (DDPMProcess("cosine", 500),
              FlowProcess("x", "logit_normal", 0.3, 0.8, 2.0, "min_snr")):
        meta = json.loads(json.dumps(p.metadata()))
        q = process_from_metadata(meta)
        assert type(q) is type(p) and q.metadata() == p.metadata()


def test_build_process_from_config_dataclass_and_dict():
    from latentdit.config import DiffusionConfig

    p = build_process(DiffusionConfig())
    assert isinstance(p, DDPMProcess) and p.metadata() == {"process": "ddpm", "noise_schedule": "linear",
                                                           "diffusion_steps": 1000}
    f = build_process({"process": "flow", "time_shift": 2.5, "noise_schedule": "linear", "sample_steps": 50})
    assert isinstance(f, FlowProcess) and f.time_shift == 2.5 and f.default_sampler in ("euler", "heun")


@pytest.mark.parametrize("fields, match", [
    ({"process": "fl0w"}, r"diffusion.process: expected one of ddpm, flow, got 'fl0w'"),
    ({"process": "flow", "prediction": "eps"}, r"diffusion.prediction: expected one of v, x"),
    ({"process": "flow", "time_sampling": "beta"}, r"diffusion.time_sampling"),
    ({"process": "flow", "time_shift": 0}, r"diffusion.time_shift: expected a finite number > 0"),
    ({"process": "flow", "logit_std": -1.0}, r"diffusion.logit_std"),
    ({"process": "flow", "logit_mean": math.nan}, r"diffusion.logit_mean"),
    ({"process": "flow", "loss_weighting": "snr"}, r"diffusion.loss_weighting"),
    ({"process": "ddpm", "noise_schedule": "quadratic"}, r"diffusion.noise_schedule"),
    ({"process": "ddpm", "diffusion_steps": 0}, r"diffusion.diffusion_steps"),
])
def test_bad_settings_name_the_field(fields, match):
    with pytest.raises(LatentDiTError, match=match):
        build_process(fields)


def test_metadata_with_foreign_fields_is_refused():
    with pytest.raises(LatentDiTError, match="unknown field.*prediction"):
        process_from_metadata({"process": "ddpm", "prediction": "v"})


# ----------------------------------------------------------------------------------------------
# Flow samplers on a linear-Gaussian toy with a known exact flow
# ----------------------------------------------------------------------------------------------
# Data x0 ~ N(μ, σ²) per element. Then x_t ~ N((1 − t)μ, s(t)²) with s(t)² = (1 − t)²σ² + t², the exact
# probability-flow velocity is v(x, t) = −μ + (t − (1 − t)σ²)/s(t)² · (x − (1 − t)μ), and the ODE carries
# x_1 = z to x_0 = μ + σ·z exactly.

MU, SIGMA = 0.7, 0.4


def _toy_output(x, t_model, prediction="v"):
    t = (t_model / FLOW_MODEL_TIME_SCALE).double().view(-1, 1)
    x = x.double()
    s2 = (1 - t) ** 2 * SIGMA ** 2 + t ** 2
    v = -MU + (t - (1 - t) * SIGMA ** 2) / s2 * (x - (1 - t) * MU)
    return v if prediction == "v" else x - t * v  # x-prediction: the exact posterior mean E[x0 | x_t]


def _toy_error(sampler, steps, prediction="v", shift=1.0):
    from latentdit.diffusion.samplers import flow_grid

    z = torch.linspace(-2, 2, 9, dtype=torch.float64).view(-1, 1)
    grid = flow_grid(FlowProcess(prediction=prediction), steps, shift)
    x0 = sampler(lambda x, t: _toy_output(x, t, prediction), z.clone(), grid)
    return (x0 - (MU + SIGMA * z)).abs().max().item()


@pytest.mark.parametrize("prediction", ["v", "x"])
def test_euler_converges_at_first_and_heun_at_second_order(prediction):
    from latentdit.diffusion.samplers import sample_euler, sample_heun

    euler = [_toy_error(sample_euler, n, prediction) for n in (20, 40, 80)]
    heun = [_toy_error(sample_heun, n, prediction) for n in (20, 40, 80)]
    for coarse, fine in zip(euler, euler[1:]):
        assert 1.7 < coarse / fine < 2.3, euler      # error ∝ h
    for coarse, fine in zip(heun, heun[1:]):
        assert 3.4 < coarse / fine < 4.6, heun       # error ∝ h²
    assert heun[-1] < euler[-1] / 10


def test_shifted_step_grid():
    from latentdit.diffusion.samplers import flow_grid, sample_heun

    grid = flow_grid(FlowProcess(), 4, time_shift=3.0)
    expected = [3 * t / (1 + 2 * t) for t in (1.0, 0.75, 0.5, 0.25, 0.0)]
    assert grid.times == pytest.approx(expected) and grid.times[0] == 1.0 and grid.times[-1] == 0.0
    # still solves the same ODE, at second order
    coarse, fine = _toy_error(sample_heun, 40, shift=3.0), _toy_error(sample_heun, 80, shift=3.0)
    assert fine < 0.005 and 3.4 < coarse / fine < 4.6


def test_euler_maruyama_reproduces_the_data_distribution():
    from latentdit.diffusion.samplers import GeneratorNoise, flow_grid, sample_euler_maruyama

    g = torch.Generator().manual_seed(0)
    z = torch.randn(40_000, 1, generator=g, dtype=torch.float64)
    x0 = sample_euler_maruyama(_toy_output, z, flow_grid(FlowProcess(), 200), noise=GeneratorNoise(g))
    assert abs(x0.mean().item() - MU) < 0.01
    assert abs(x0.std().item() - SIGMA) < 0.01
    # it is a different map from the ODE's: samples are not the deterministic image of z
    assert (x0 - (MU + SIGMA * z)).abs().mean() > 0.05


def test_heun_costs_two_evaluations_per_step_but_one_on_the_last():
    from latentdit.diffusion.samplers import SAMPLERS, flow_grid, sample_heun

    calls = []
    sample_heun(lambda x, t: calls.append(float(t[0])) or _toy_output(x, t), torch.zeros(1, 1, dtype=torch.float64),
                flow_grid(FlowProcess(), 5))
    assert len(calls) == SAMPLERS["heun"].evaluations(5) == 9
    assert 0.0 not in calls  # the velocity at t = 0 is never asked for

"""Samplers: single DDPM/DDIM steps and whole loops against diffusers' schedulers, determinism, the
model's timestep input; flow samplers on a linear-Gaussian toy with a known exact flow."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler

from latentdit.diffusion import (
    FLOW_MODEL_TIME_SCALE,
    SAMPLERS,
    FlowProcess,
    GeneratorNoise,
    create_diffusion,
    ddim_step,
    ddpm_step,
    flow_grid,
    sample_ab2,
    sample_ddim,
    sample_ddpm,
    sample_dpm_2m,
    sample_euler,
    sample_euler_maruyama,
    sample_heun,
)
from latentdit.errors import LatentDiTError

try:
    from diffusion_helpers import F64, SHAPE, ddpm_scheduler, randn, toy_model
except ImportError:  # run as the tests package
    from tests.diffusion_helpers import F64, SHAPE, ddpm_scheduler, randn, toy_model




@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
def test_ddpm_step_matches_scheduler(schedule: str, variance_type: str) -> None:
    diffusion = create_diffusion(noise_schedule=schedule, learn_sigma=False, sigma_small=variance_type == "fixed_small")
    ref = ddpm_scheduler(schedule, variance_type)
    x_t, eps = randn(*SHAPE, seed=4, dtype=F64), randn(*SHAPE, seed=5, dtype=F64)
    for t in [0, 1, 37, 640, 999]:
        expected = ref.step(eps, t, x_t, generator=torch.Generator().manual_seed(7))
        ours, pred_x0 = ddpm_step(diffusion, eps, x_t, torch.full((SHAPE[0],), t),
                                  generator=torch.Generator().manual_seed(7))
        torch.testing.assert_close(ours, expected.prev_sample, rtol=1e-4, atol=2e-4)
        torch.testing.assert_close(pred_x0, expected.pred_original_sample, rtol=1e-4, atol=2e-3)


def test_ddpm_step_learned_range_matches_scheduler() -> None:
    diffusion = create_diffusion(learn_sigma=True)
    ref = ddpm_scheduler("linear", "learned_range")
    x_t = randn(*SHAPE, seed=6, dtype=F64)
    out = torch.cat([randn(*SHAPE, seed=7, dtype=F64), torch.tanh(randn(*SHAPE, seed=8, dtype=F64))], dim=1)
    for t in [1, 250, 999]:
        expected = ref.step(out, t, x_t, generator=torch.Generator().manual_seed(9)).prev_sample
        ours, _ = ddpm_step(diffusion, out, x_t, t, generator=torch.Generator().manual_seed(9))
        torch.testing.assert_close(ours, expected, rtol=1e-4, atol=2e-4)


def test_ddpm_step_injected_noise_and_no_noise_at_zero() -> None:
    diffusion = create_diffusion(learn_sigma=False, sigma_small=True)
    x_t, eps, z = randn(*SHAPE, seed=10), randn(*SHAPE, seed=11), randn(*SHAPE, seed=12)
    t = torch.tensor([0, 5, 999])
    ours, _ = ddpm_step(diffusion, eps, x_t, t, noise=z)
    out = diffusion.p_mean_variance(eps, x_t, t)
    expected = out["mean"] + torch.exp(0.5 * out["log_variance"]) * z
    torch.testing.assert_close(ours[1:], expected[1:])
    torch.testing.assert_close(ours[0], out["mean"][0])


@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim_step_matches_scheduler(eta: float) -> None:
    diffusion = create_diffusion("ddim50", learn_sigma=False)
    assert diffusion.timestep_map.tolist() == list(range(0, 1000, 20))
    ref = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False, set_alpha_to_one=True,
                        steps_offset=0, timestep_spacing="leading", prediction_type="epsilon")
    ref.set_timesteps(50)
    assert ref.timesteps.tolist() == diffusion.timestep_map[::-1].tolist()
    x_t, eps, z = (randn(*SHAPE, seed=s, dtype=F64) for s in (13, 14, 15))
    for i in [0, 1, 25, 49]:
        t_orig = int(diffusion.timestep_map[i])
        expected = ref.step(eps, t_orig, x_t, eta=eta, variance_noise=z if eta > 0 else None)
        ours, pred_x0 = ddim_step(diffusion, eps, x_t, i, eta=eta, noise=z)
        torch.testing.assert_close(ours, expected.prev_sample, rtol=1e-4, atol=2e-4)
        torch.testing.assert_close(pred_x0, expected.pred_original_sample, rtol=1e-4, atol=2e-3)


def test_ddim_step_eta_one_is_ddpm_fixed_small() -> None:
    diffusion = create_diffusion("ddim25", learn_sigma=False, sigma_small=True)
    x_t, eps, z = randn(*SHAPE, seed=16), randn(*SHAPE, seed=17), randn(*SHAPE, seed=18)
    t = torch.tensor([1, 12, 24])
    ddim, _ = ddim_step(diffusion, eps, x_t, t, eta=1.0, noise=z)
    ddpm, _ = ddpm_step(diffusion, eps, x_t, t, noise=z)
    torch.testing.assert_close(ddim, ddpm, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- whole sampling loops vs diffusers


def test_ddpm_sample_respaced_matches_scheduler_loop() -> None:
    diffusion = create_diffusion("20", learn_sigma=False, sigma_small=True)
    ref = ddpm_scheduler("linear", "fixed_small", timestep_spacing="linspace")
    ref.set_timesteps(20)
    assert ref.timesteps.tolist() == diffusion.timestep_map[::-1].tolist()
    x_T = randn(2, 4, 5, 5, seed=19)
    ours = sample_ddpm(toy_model, x_T.clone(), diffusion, noise=GeneratorNoise(torch.Generator().manual_seed(20)))
    gen, x = torch.Generator().manual_seed(20), x_T.clone()
    for t in ref.timesteps:
        x = ref.step(toy_model(x, t.expand(x.shape[0])), t, x, generator=gen).prev_sample
    torch.testing.assert_close(ours, x, rtol=1e-4, atol=2e-4)


def test_ddim_sample_matches_scheduler_loop() -> None:
    diffusion = create_diffusion("ddim20", learn_sigma=True)
    ref = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False, set_alpha_to_one=True)
    ref.set_timesteps(20)
    x_T = randn(2, 4, 5, 5, seed=21)

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # learned-sigma output; DDIM ignores the variance
        return torch.cat([toy_model(x, t), torch.ones_like(x)], dim=1)

    ours = sample_ddim(model_fn, x_T.clone(), diffusion)
    x = x_T.clone()
    for t in ref.timesteps:
        x = ref.step(toy_model(x, t.expand(x.shape[0])), t, x, eta=0.0).prev_sample
    torch.testing.assert_close(ours, x, rtol=1e-4, atol=2e-4)



# ----------------------------------------------------------------------------- samplers


@pytest.mark.parametrize("sampler", ["ddpm", "ddim_eta0", "ddim_eta1"])
def test_samplers_are_deterministic_under_a_seed(sampler: str) -> None:
    diffusion = create_diffusion("ddim8", learn_sigma=True)

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.cat([toy_model(x, t), torch.zeros_like(x)], 1)

    def run(seed: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        x_T = torch.randn(2, 4, 4, 4, generator=gen)
        if sampler == "ddpm":
            return sample_ddpm(model_fn, x_T, diffusion, noise=GeneratorNoise(gen))
        return sample_ddim(model_fn, x_T, diffusion, noise=GeneratorNoise(gen),
                           eta=0.0 if sampler == "ddim_eta0" else 1.0)

    a, b, c = run(0), run(0), run(1)
    assert a.shape == (2, 4, 4, 4) and a.dtype == torch.float32 and torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-3


def test_ddim_eta0_depends_only_on_initial_noise() -> None:
    diffusion = create_diffusion("ddim5", learn_sigma=False)
    x_T = randn(1, 4, 3, 3, seed=37)
    a = sample_ddim(toy_model, x_T.clone(), diffusion, noise=GeneratorNoise(torch.Generator().manual_seed(1)))
    b = sample_ddim(toy_model, x_T.clone(), diffusion, noise=GeneratorNoise(torch.Generator().manual_seed(2)))
    assert torch.equal(a, b)


def test_sampler_calls_model_with_original_timesteps() -> None:
    diffusion = create_diffusion("ddim4", learn_sigma=False)
    seen: list[list[int]] = []

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        seen.append(t.tolist())
        return torch.zeros_like(x)

    sample_ddpm(model_fn, torch.zeros(2, 1, 2, 2), diffusion, noise=GeneratorNoise(torch.Generator().manual_seed(0)))
    assert seen == [[750, 750], [500, 500], [250, 250], [0, 0]]


def test_negative_eta_is_refused() -> None:
    diffusion = create_diffusion("ddim5", learn_sigma=False)
    with pytest.raises(LatentDiTError, match="eta"):
        sample_ddim(toy_model, torch.zeros(1, 4, 2, 2), diffusion, eta=-0.5)


# ----------------------------------------------------------------------------- flow samplers on a linear-Gaussian toy with a known exact flow
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
    z = torch.linspace(-2, 2, 9, dtype=torch.float64).view(-1, 1)
    grid = flow_grid(FlowProcess(prediction=prediction), steps, shift)
    x0 = sampler(lambda x, t: _toy_output(x, t, prediction), z.clone(), grid)
    return (x0 - (MU + SIGMA * z)).abs().max().item()


@pytest.mark.parametrize("prediction", ["v", "x"])
def test_euler_converges_at_first_and_heun_at_second_order(prediction):
    euler = [_toy_error(sample_euler, n, prediction) for n in (20, 40, 80)]
    heun = [_toy_error(sample_heun, n, prediction) for n in (20, 40, 80)]
    for coarse, fine in zip(euler, euler[1:]):
        assert 1.7 < coarse / fine < 2.3, euler      # error ∝ h
    for coarse, fine in zip(heun, heun[1:]):
        assert 3.4 < coarse / fine < 4.6, heun       # error ∝ h²
    assert heun[-1] < euler[-1] / 10


@pytest.mark.parametrize("prediction", ["v", "x"])
@pytest.mark.parametrize("sampler", [sample_ab2, sample_dpm_2m])
def test_multistep_samplers_are_second_order_at_one_evaluation_per_step(sampler, prediction):
    errors = [_toy_error(sampler, n, prediction) for n in (40, 80, 160)]
    if sampler is sample_ab2:
        for coarse, fine in zip(errors, errors[1:]):
            assert 3.2 < coarse / fine < 4.8, errors     # error ∝ h²
    else:
        # on a grid uniform in t the steps in λ = log((1 − t)/t) next to t = 1 do not shrink with h, so the
        # order approaches 2 only as the grid refines
        assert 2.6 < errors[0] / errors[1] < errors[1] / errors[2] < 4.8, errors
    # at the same number of model evaluations it beats Euler several times over, and Heun
    assert _toy_error(sampler, 10, prediction) < _toy_error(sample_euler, 10, prediction) / 5
    assert _toy_error(sampler, 9, prediction) < _toy_error(sample_heun, 5, prediction) / 3   # 9 evaluations each
    calls = []
    sampler(lambda x, t: calls.append(float(t[0])) or _toy_output(x, t, prediction),
            torch.zeros(1, 1, dtype=torch.float64), flow_grid(FlowProcess(prediction=prediction), 7))
    assert len(calls) == SAMPLERS[sampler.__name__.replace("sample_", "").replace("_", "-")].evaluations(7) == 7
    assert 0.0 not in calls


def test_dpm_2m_first_and_last_steps_are_ddim():
    """From t = 1 a step keeps x̂0 and rescales the noise (DDIM); onto t = 0 it lands on x̂0."""
    z = torch.linspace(-2, 2, 5, dtype=torch.float64).view(-1, 1)
    one = sample_dpm_2m(lambda x, t: _toy_output(x, t, "x"), z.clone(), flow_grid(FlowProcess(prediction="x"), 1))
    torch.testing.assert_close(one, _toy_output(z, torch.full((5,), FLOW_MODEL_TIME_SCALE, dtype=torch.float64), "x"))
    grid = flow_grid(FlowProcess(prediction="x"), 2)
    x0_at_1 = _toy_output(z, torch.full((5,), FLOW_MODEL_TIME_SCALE, dtype=torch.float64), "x")
    halfway = 0.5 * z + 0.5 * x0_at_1
    x0_at_half = _toy_output(halfway, torch.full((5,), 0.5 * FLOW_MODEL_TIME_SCALE, dtype=torch.float64), "x")
    torch.testing.assert_close(sample_dpm_2m(lambda x, t: _toy_output(x, t, "x"), z.clone(), grid), x0_at_half)


def test_shifted_step_grid():
    grid = flow_grid(FlowProcess(), 4, time_shift=3.0)
    expected = [3 * t / (1 + 2 * t) for t in (1.0, 0.75, 0.5, 0.25, 0.0)]
    assert grid.times == pytest.approx(expected) and grid.times[0] == 1.0 and grid.times[-1] == 0.0
    # still solves the same ODE, at second order
    coarse, fine = _toy_error(sample_heun, 40, shift=3.0), _toy_error(sample_heun, 80, shift=3.0)
    assert fine < 0.005 and 3.4 < coarse / fine < 4.6


def test_euler_maruyama_reproduces_the_data_distribution():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(40_000, 1, generator=g, dtype=torch.float64)
    x0 = sample_euler_maruyama(_toy_output, z, flow_grid(FlowProcess(), 200), noise=GeneratorNoise(g))
    assert abs(x0.mean().item() - MU) < 0.01
    assert abs(x0.std().item() - SIGMA) < 0.01
    # it is a different map from the ODE's: samples are not the deterministic image of z
    assert (x0 - (MU + SIGMA * z)).abs().mean() > 0.05


def test_heun_costs_two_evaluations_per_step_but_one_on_the_last():
    calls = []
    sample_heun(lambda x, t: calls.append(float(t[0])) or _toy_output(x, t), torch.zeros(1, 1, dtype=torch.float64),
                flow_grid(FlowProcess(), 5))
    assert len(calls) == SAMPLERS["heun"].evaluations(5) == 9
    assert 0.0 not in calls  # the velocity at t = 0 is never asked for

"""Gaussian diffusion: conformance with diffusers' DDPM/DDIM schedulers, the hybrid loss, respacing, samplers."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from latentdit.diffusion import (
    GaussianDiffusion,
    create_diffusion,
    ddim_sample,
    ddim_step,
    ddpm_sample,
    ddpm_step,
    get_betas,
    respace_betas,
    space_timesteps,
)
from latentdit.errors import LatentDiTError

SHAPE = (3, 4, 6, 6)
F64 = torch.float64  # diffusers keeps float32 schedule arrays; float64 inputs isolate that rounding
DIFFUSERS_SCHEDULE = {"linear": "linear", "cosine": "squaredcos_cap_v2"}


def _randn(*shape: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _toy_model(x: torch.Tensor, t_original: torch.Tensor) -> torch.Tensor:
    """A deterministic stand-in for a network: depends on x and on the ORIGINAL timestep index."""
    phase = (t_original.to(x.dtype) / 37.0).reshape(-1, *([1] * (x.ndim - 1)))
    return 0.6 * torch.tanh(x) + 0.2 * torch.sin(phase + x)


def _ddpm_scheduler(schedule: str, variance_type: str, **kw) -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule=DIFFUSERS_SCHEDULE[schedule],
                         variance_type=variance_type, clip_sample=False, prediction_type="epsilon", **kw)


# ----------------------------------------------------------------------------- schedules


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_schedule_arrays_match_diffusers(schedule: str) -> None:
    betas = get_betas(schedule, 1000)
    assert betas.dtype == np.float64 and betas.shape == (1000,)
    ref = _ddpm_scheduler(schedule, "fixed_small")
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


# ----------------------------------------------------------------------------- forward process and posterior


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_q_sample_matches_add_noise(schedule: str) -> None:
    diffusion = create_diffusion(noise_schedule=schedule, learn_sigma=False)
    ref = _ddpm_scheduler(schedule, "fixed_small")
    x0, noise = _randn(*SHAPE, seed=0), _randn(*SHAPE, seed=1)
    t = torch.tensor([0, 417, 999])
    ours = diffusion.q_sample(x0, t, noise)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref.add_noise(x0, noise, t), rtol=1e-4, atol=1e-5)


def test_predict_x0_inverts_q_sample() -> None:
    diffusion = create_diffusion(learn_sigma=False)
    x0, noise = _randn(*SHAPE, seed=0, dtype=torch.float64), _randn(*SHAPE, seed=1, dtype=torch.float64)
    t = torch.tensor([0, 500, 999])
    x_t = diffusion.q_sample(x0, t, noise)
    torch.testing.assert_close(diffusion.predict_x0_from_eps(x_t, t, noise), x0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(diffusion.predict_eps_from_x0(x_t, t, x0), noise, rtol=1e-9, atol=1e-9)


def _in_float64(ref: DDPMScheduler) -> DDPMScheduler:
    """The scheduler's own betas with its cumulative products redone in float64, so that comparing
    formulas is not drowned by float32 cancellation (e.g. 1 - abar_t / abar_{t-1} at small t)."""
    ref.betas = ref.betas.double()
    ref.alphas = 1.0 - ref.betas
    ref.alphas_cumprod = torch.cumprod(ref.alphas, dim=0)
    ref.one = torch.tensor(1.0, dtype=torch.float64)
    return ref


def _diffusers_posterior_mean(ref: DDPMScheduler, x0: torch.Tensor, t: int, x_t: torch.Tensor) -> torch.Tensor:
    """Mean of DDPMScheduler.step with prediction_type="sample" (model output = x0): its step output
    minus its own noise, replayed from the same seed."""
    prev = ref.step(x0, t, x_t, generator=torch.Generator().manual_seed(123)).prev_sample
    if t == 0:
        return prev
    z = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(123), dtype=x_t.dtype)
    return prev - ref._get_variance(t) ** 0.5 * z


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
def test_posterior_matches_ddpm_scheduler(schedule: str, variance_type: str) -> None:
    diffusion = create_diffusion(noise_schedule=schedule, learn_sigma=False, sigma_small=variance_type == "fixed_small")
    assert diffusion.model_var_type == variance_type
    ref = _in_float64(DDPMScheduler(num_train_timesteps=1000, beta_schedule=DIFFUSERS_SCHEDULE[schedule],
                                    variance_type=variance_type, clip_sample=False, prediction_type="sample"))
    x0, x_t = _randn(*SHAPE, seed=2, dtype=F64), _randn(*SHAPE, seed=3, dtype=F64)
    for t in [0, 1, 10, 500, 998, 999]:
        tt = torch.full((SHAPE[0],), t)
        mean, var, log_var = diffusion.q_posterior_mean_variance(x0, x_t, tt)
        torch.testing.assert_close(mean, _diffusers_posterior_mean(ref, x0, t, x_t), rtol=1e-5, atol=2e-6)
        ref_small = ref._get_variance(t, variance_type="fixed_small").double().item()
        assert var.flatten().double().numpy() == pytest.approx(ref_small, rel=1e-6, abs=1e-15)
        # The model posterior from the eps that reproduces x0 has the same mean.
        eps = diffusion.predict_eps_from_x0(x_t, tt, x0)
        out = diffusion.p_mean_variance(eps, x_t, tt)
        torch.testing.assert_close(out["mean"], mean, rtol=1e-9, atol=1e-9)
        ref_var = ref._get_variance(t).double().item()
        if t > 0:
            assert out["variance"].double().numpy() == pytest.approx(ref_var, rel=1e-6)
            assert log_var.double().numpy() == pytest.approx(math.log(ref_small), rel=1e-6, abs=1e-7)
        else:
            # t = 0 never adds noise; the log variance is clipped to the posterior variance at t = 1 in
            # both fixed cases (diffusers keeps beta_0 for fixed_large and 1e-20 for fixed_small there).
            clipped = diffusion.posterior_variance[1]
            assert out["variance"].double().numpy() == pytest.approx(
                clipped if variance_type == "fixed_large" else 0.0, rel=1e-6, abs=1e-12)
            assert out["log_variance"].double().numpy() == pytest.approx(math.log(clipped), rel=1e-6)


# ----------------------------------------------------------------------------- single steps vs diffusers


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
def test_ddpm_step_matches_scheduler(schedule: str, variance_type: str) -> None:
    diffusion = create_diffusion(noise_schedule=schedule, learn_sigma=False, sigma_small=variance_type == "fixed_small")
    ref = _ddpm_scheduler(schedule, variance_type)
    x_t, eps = _randn(*SHAPE, seed=4, dtype=F64), _randn(*SHAPE, seed=5, dtype=F64)
    for t in [0, 1, 37, 640, 999]:
        expected = ref.step(eps, t, x_t, generator=torch.Generator().manual_seed(7))
        ours, pred_x0 = ddpm_step(diffusion, eps, x_t, torch.full((SHAPE[0],), t),
                                  generator=torch.Generator().manual_seed(7))
        torch.testing.assert_close(ours, expected.prev_sample, rtol=1e-4, atol=2e-4)
        torch.testing.assert_close(pred_x0, expected.pred_original_sample, rtol=1e-4, atol=2e-3)


def test_ddpm_step_learned_range_matches_scheduler() -> None:
    diffusion = create_diffusion(learn_sigma=True)
    ref = _ddpm_scheduler("linear", "learned_range")
    x_t = _randn(*SHAPE, seed=6, dtype=F64)
    out = torch.cat([_randn(*SHAPE, seed=7, dtype=F64), torch.tanh(_randn(*SHAPE, seed=8, dtype=F64))], dim=1)
    for t in [1, 250, 999]:
        expected = ref.step(out, t, x_t, generator=torch.Generator().manual_seed(9)).prev_sample
        ours, _ = ddpm_step(diffusion, out, x_t, t, generator=torch.Generator().manual_seed(9))
        torch.testing.assert_close(ours, expected, rtol=1e-4, atol=2e-4)


def test_ddpm_step_injected_noise_and_no_noise_at_zero() -> None:
    diffusion = create_diffusion(learn_sigma=False, sigma_small=True)
    x_t, eps, z = _randn(*SHAPE, seed=10), _randn(*SHAPE, seed=11), _randn(*SHAPE, seed=12)
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
    x_t, eps, z = (_randn(*SHAPE, seed=s, dtype=F64) for s in (13, 14, 15))
    for i in [0, 1, 25, 49]:
        t_orig = int(diffusion.timestep_map[i])
        expected = ref.step(eps, t_orig, x_t, eta=eta, variance_noise=z if eta > 0 else None)
        ours, pred_x0 = ddim_step(diffusion, eps, x_t, i, eta=eta, noise=z)
        torch.testing.assert_close(ours, expected.prev_sample, rtol=1e-4, atol=2e-4)
        torch.testing.assert_close(pred_x0, expected.pred_original_sample, rtol=1e-4, atol=2e-3)


def test_ddim_step_eta_one_is_ddpm_fixed_small() -> None:
    diffusion = create_diffusion("ddim25", learn_sigma=False, sigma_small=True)
    x_t, eps, z = _randn(*SHAPE, seed=16), _randn(*SHAPE, seed=17), _randn(*SHAPE, seed=18)
    t = torch.tensor([1, 12, 24])
    ddim, _ = ddim_step(diffusion, eps, x_t, t, eta=1.0, noise=z)
    ddpm, _ = ddpm_step(diffusion, eps, x_t, t, noise=z)
    torch.testing.assert_close(ddim, ddpm, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- whole sampling loops vs diffusers


def test_ddpm_sample_respaced_matches_scheduler_loop() -> None:
    diffusion = create_diffusion("20", learn_sigma=False, sigma_small=True)
    ref = _ddpm_scheduler("linear", "fixed_small", timestep_spacing="linspace")
    ref.set_timesteps(20)
    assert ref.timesteps.tolist() == diffusion.timestep_map[::-1].tolist()
    x_T = _randn(2, 4, 5, 5, seed=19)
    ours = ddpm_sample(diffusion, _toy_model, x_T.shape, generator=torch.Generator().manual_seed(20), noise=x_T)
    gen, x = torch.Generator().manual_seed(20), x_T.clone()
    for t in ref.timesteps:
        x = ref.step(_toy_model(x, t.expand(x.shape[0])), t, x, generator=gen).prev_sample
    torch.testing.assert_close(ours, x, rtol=1e-4, atol=2e-4)


def test_ddim_sample_matches_scheduler_loop() -> None:
    diffusion = create_diffusion("ddim20", learn_sigma=True)
    ref = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False, set_alpha_to_one=True)
    ref.set_timesteps(20)
    x_T = _randn(2, 4, 5, 5, seed=21)

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # learned-sigma output; DDIM ignores the variance
        return torch.cat([_toy_model(x, t), torch.ones_like(x)], dim=1)

    ours = ddim_sample(diffusion, model_fn, x_T.shape, noise=x_T)
    x = x_T.clone()
    for t in ref.timesteps:
        x = ref.step(_toy_model(x, t.expand(x.shape[0])), t, x, eta=0.0).prev_sample
    torch.testing.assert_close(ours, x, rtol=1e-4, atol=2e-4)


# ----------------------------------------------------------------------------- learned variance and the hybrid loss


def test_learned_range_endpoints() -> None:
    diffusion = create_diffusion(learn_sigma=True)
    x_t, eps = _randn(*SHAPE, seed=22), _randn(*SHAPE, seed=23)
    t = torch.tensor([0, 1, 999])
    low = diffusion.p_mean_variance(torch.cat([eps, -torch.ones_like(eps)], 1), x_t, t)["log_variance"]
    high = diffusion.p_mean_variance(torch.cat([eps, torch.ones_like(eps)], 1), x_t, t)["log_variance"]
    expected_low = np.log([diffusion.posterior_variance[1], diffusion.posterior_variance[1], diffusion.posterior_variance[999]])
    expected_high = np.log(diffusion.betas[[0, 1, 999]])
    np.testing.assert_allclose(low[:, 0, 0, 0].double().numpy(), expected_low, rtol=1e-6)
    np.testing.assert_allclose(high[:, 0, 0, 0].double().numpy(), expected_high, rtol=1e-6)
    mid = diffusion.p_mean_variance(torch.cat([eps, torch.zeros_like(eps)], 1), x_t, t)["log_variance"]
    torch.testing.assert_close(mid, (low + high) / 2)


def _closed_form_posterior(betas: np.ndarray, x0: torch.Tensor, x_t: torch.Tensor, t: int) -> tuple[torch.Tensor, float]:
    """q(x_{t-1} | x_t, x_0) written out from the betas (t > 0): mean and variance."""
    abar = np.cumprod(1.0 - betas)
    a_t, ab_t, ab_prev = 1.0 - betas[t], abar[t], abar[t - 1]
    mean = (math.sqrt(ab_prev) * betas[t] / (1 - ab_t)) * x0 + (math.sqrt(a_t) * (1 - ab_prev) / (1 - ab_t)) * x_t
    return mean, betas[t] * (1 - ab_prev) / (1 - ab_t)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_vb_term_is_gaussian_kl_in_bits(schedule: str) -> None:
    betas = get_betas(schedule, 1000)
    diffusion = GaussianDiffusion(betas, "learned_range")
    x0, noise = _randn(*SHAPE, seed=24, dtype=torch.float64), _randn(*SHAPE, seed=25, dtype=torch.float64)
    output = torch.cat([_randn(*SHAPE, seed=26, dtype=torch.float64),
                        torch.tanh(_randn(*SHAPE, seed=27, dtype=torch.float64))], dim=1)
    t = torch.tensor([1, 300, 999])
    losses = diffusion.training_losses(lambda x, tm: output, x0, t, noise=noise)
    abar = np.cumprod(1.0 - betas)
    for row, ti in enumerate(t.tolist()):
        x_t = math.sqrt(abar[ti]) * x0[row] + math.sqrt(1 - abar[ti]) * noise[row]
        true_mean, true_var = _closed_form_posterior(betas, x0[row], x_t, ti)
        eps, v = output[row, :4], output[row, 4:]
        pred_x0 = (x_t - math.sqrt(1 - abar[ti]) * eps) / math.sqrt(abar[ti])
        model_mean, _ = _closed_form_posterior(betas, pred_x0, x_t, ti)
        frac = (v + 1) / 2
        model_log_var = frac * math.log(betas[ti]) + (1 - frac) * math.log(true_var)
        kl = torch.distributions.kl_divergence(
            torch.distributions.Normal(true_mean, math.sqrt(true_var)),
            torch.distributions.Normal(model_mean, torch.exp(0.5 * model_log_var)))
        expected_vb = kl.mean() / math.log(2)
        assert losses["vb"][row].item() == pytest.approx(expected_vb.item(), rel=1e-9, abs=1e-12)
        expected_mse = ((noise[row] - eps) ** 2).mean()
        assert losses["mse"][row].item() == pytest.approx(expected_mse.item(), rel=1e-12)
    torch.testing.assert_close(losses["loss"], losses["mse"] + losses["vb"])


def _released_decoder_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """The released DiT/ADM decoder log-likelihood, written out from its formula: tanh-approximated
    normal CDF at the bin edges x ± 1/255 (in units of the std), every probability floored at 1e-12
    before the log, the bins beyond ±0.999 open to ±infinity."""
    def cdf(z: torch.Tensor) -> torch.Tensor:
        return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (z + 0.044715 * z ** 3)))

    below = cdf((x - mean + 1.0 / 255.0) / torch.exp(log_scale))
    above = 1.0 - cdf((x - mean - 1.0 / 255.0) / torch.exp(log_scale))
    inside = below + above - 1.0
    floor = torch.full_like(x, 1e-12)
    probability = torch.where(x < -0.999, below, torch.where(x > 0.999, above, inside))
    return torch.log(torch.maximum(probability, floor))


def _exact_decoder_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """The same bin probability with the exact normal CDF and no floor (what the released code does not do)."""
    normal = torch.distributions.Normal(mean, torch.exp(log_scale))
    upper = torch.where(x > 0.999, torch.ones_like(x), normal.cdf(x + 1 / 255))
    lower = torch.where(x < -0.999, torch.zeros_like(x), normal.cdf(x - 1 / 255))
    return torch.log(upper - lower)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_discretised_log_likelihood_is_the_released_formula(dtype: torch.dtype) -> None:
    from latentdit.diffusion import discretized_gaussian_log_likelihood

    x = torch.tensor([-1.0, -0.9995, -0.999, -0.5, 0.0, 0.0, 0.3, 0.999, 0.9995, 1.0, 0.2, -0.2], dtype=dtype)
    mean = torch.tensor([-0.98, -1.2, -0.99, -0.49, 0.001, 0.9, 0.31, 0.99, 1.3, 0.95, -0.7, 0.6], dtype=dtype)
    log_scale = torch.tensor([-4.6, -3.0, -4.0, -5.0, -6.0, -4.5, -2.0, -4.6, -3.0, -5.0, -3.5, -4.0], dtype=dtype)
    ours = discretized_gaussian_log_likelihood(x, mean, log_scale)
    expected = _released_decoder_log_likelihood(x, mean, log_scale)
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-6)
    assert ours.min().item() == pytest.approx(math.log(1e-12))  # far from the mean: the floor, not -inf or -200
    exact = _exact_decoder_log_likelihood(x, mean, log_scale)
    assert (ours - exact).abs().max().item() > 1.0


def test_vb_term_at_t0_is_the_released_decoder_nll() -> None:
    diffusion = create_diffusion(learn_sigma=True)
    shape = (4, 2, 3, 3)
    x0 = torch.rand(*shape, generator=torch.Generator().manual_seed(28), dtype=torch.float64) * 2.2 - 1.1
    x0 = x0.clamp(-1.0, 1.0)  # some elements exactly at ±1 (the open outer bins)
    noise = _randn(*shape, seed=28, dtype=torch.float64)
    # eps far from the noise for some samples: the model mean lies many stds away, where the floor acts
    eps = noise + 6.0 * _randn(*shape, seed=29, dtype=torch.float64) * torch.tensor([0.0, 0.1, 1.0, 3.0]).reshape(4, 1, 1, 1)
    output = torch.cat([eps, torch.tanh(_randn(*shape, seed=30, dtype=torch.float64))], 1)
    t = torch.zeros(shape[0], dtype=torch.long)
    vb = diffusion.training_losses(lambda x, tm: output, x0, t, noise=noise)["vb"]
    # the model mean and variance at t = 0 written out: mean = pred_x0 (coef2 = 0), log variance
    # interpolates between log beta~_1 and log beta_0
    abar0, beta0 = 1.0 - diffusion.betas[0], diffusion.betas[0]
    x_t = math.sqrt(abar0) * x0 + math.sqrt(1.0 - abar0) * noise
    mean = (x_t - math.sqrt(1.0 - abar0) * eps) / math.sqrt(abar0)
    frac = (output[:, 2:] + 1.0) / 2.0
    log_var = frac * math.log(beta0) + (1.0 - frac) * math.log(diffusion.posterior_variance[1])
    per_element = _released_decoder_log_likelihood(x0, mean, 0.5 * log_var)
    expected = -per_element.mean(dim=(1, 2, 3)) / math.log(2.0)
    torch.testing.assert_close(vb, expected, rtol=1e-9, atol=1e-9)
    exact = -_exact_decoder_log_likelihood(x0, mean, 0.5 * log_var).mean(dim=(1, 2, 3)) / math.log(2.0)
    assert (vb - exact).abs().max().item() > 1.0  # the floor matters for the far-off samples


def test_hybrid_loss_stops_gradient_through_the_mean() -> None:
    diffusion = create_diffusion(learn_sigma=True)
    x0, noise = _randn(*SHAPE, seed=30), _randn(*SHAPE, seed=31)
    output = torch.cat([_randn(*SHAPE, seed=32), 0.5 * torch.tanh(_randn(*SHAPE, seed=33))], 1).requires_grad_(True)
    losses = diffusion.training_losses(lambda x, tm: output, x0, torch.tensor([0, 10, 900]), noise=noise)
    (grad_vb,) = torch.autograd.grad(losses["vb"].sum(), output, retain_graph=True)
    assert torch.all(grad_vb[:, :4] == 0) and torch.any(grad_vb[:, 4:] != 0)
    (grad_mse,) = torch.autograd.grad(losses["mse"].sum(), output)
    assert torch.all(grad_mse[:, 4:] == 0) and torch.any(grad_mse[:, :4] != 0)


def test_fixed_variance_loss_is_plain_mse() -> None:
    diffusion = create_diffusion(learn_sigma=False)
    x0, noise, eps = _randn(*SHAPE, seed=34), _randn(*SHAPE, seed=35), _randn(*SHAPE, seed=36)
    losses = diffusion.training_losses(lambda x, tm: eps, x0, torch.tensor([0, 1, 2]), noise=noise)
    torch.testing.assert_close(losses["mse"], ((noise - eps) ** 2).mean(dim=(1, 2, 3)))
    assert torch.all(losses["vb"] == 0)
    torch.testing.assert_close(losses["loss"], losses["mse"])


def test_training_losses_pass_original_timesteps_and_kwargs() -> None:
    diffusion = create_diffusion("ddim10", learn_sigma=True)
    seen = {}

    def model_fn(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        seen["t"], seen["y"] = t.clone(), y
        return torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:])

    diffusion.training_losses(model_fn, torch.zeros(*SHAPE), torch.tensor([0, 4, 9]), model_kwargs={"y": "labels"})
    assert seen["t"].tolist() == [0, 400, 900] and seen["t"].dtype == torch.long and seen["y"] == "labels"


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


# ----------------------------------------------------------------------------- samplers


@pytest.mark.parametrize("sampler", ["ddpm", "ddim_eta0", "ddim_eta1"])
def test_samplers_are_deterministic_under_a_seed(sampler: str) -> None:
    diffusion = create_diffusion("ddim8", learn_sigma=True)

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.cat([_toy_model(x, t), torch.zeros_like(x)], 1)

    def run(seed: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        if sampler == "ddpm":
            return ddpm_sample(diffusion, model_fn, (2, 4, 4, 4), generator=gen)
        return ddim_sample(diffusion, model_fn, (2, 4, 4, 4), generator=gen, eta=0.0 if sampler == "ddim_eta0" else 1.0)

    a, b, c = run(0), run(0), run(1)
    assert a.shape == (2, 4, 4, 4) and a.dtype == torch.float32 and torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-3


def test_ddim_eta0_depends_only_on_initial_noise() -> None:
    diffusion = create_diffusion("ddim5", learn_sigma=False)
    x_T = _randn(1, 4, 3, 3, seed=37)
    a = ddim_sample(diffusion, _toy_model, x_T.shape, generator=torch.Generator().manual_seed(1), noise=x_T)
    b = ddim_sample(diffusion, _toy_model, x_T.shape, generator=torch.Generator().manual_seed(2), noise=x_T)
    assert torch.equal(a, b)


def test_sampler_calls_model_with_original_timesteps() -> None:
    diffusion = create_diffusion("ddim4", learn_sigma=False)
    seen: list[list[int]] = []

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        seen.append(t.tolist())
        return torch.zeros_like(x)

    ddpm_sample(diffusion, model_fn, (2, 1, 2, 2), generator=torch.Generator().manual_seed(0))
    assert seen == [[750, 750], [500, 500], [250, 250], [0, 0]]


# ----------------------------------------------------------------------------- bad input


def test_bad_inputs_raise_clear_errors() -> None:
    diffusion = create_diffusion(learn_sigma=True)
    x = torch.zeros(*SHAPE)
    with pytest.raises(LatentDiTError, match="learn_sigma"):
        diffusion.p_mean_variance(torch.zeros(*SHAPE), x, 5)
    with pytest.raises(LatentDiTError, match="channels"):
        diffusion.p_mean_variance(torch.zeros(3, 3, 6, 6), x, 5)
    with pytest.raises(LatentDiTError, match="integer"):
        diffusion.q_sample(x, torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(LatentDiTError, match="model_var_type"):
        GaussianDiffusion(get_betas(), "learned")
    with pytest.raises(LatentDiTError, match="betas"):
        GaussianDiffusion(np.array([0.1, 0.0]))
    with pytest.raises(LatentDiTError, match="timestep_map"):
        GaussianDiffusion(np.full(10, 0.1), timestep_map=[0, 1])
    with pytest.raises(LatentDiTError, match="eta"):
        ddim_sample(diffusion, _toy_model, (1, 4, 2, 2), eta=-0.5)
    with pytest.raises(LatentDiTError, match="initial noise"):
        ddpm_sample(diffusion, _toy_model, (1, 4, 2, 2), noise=torch.zeros(1, 4, 3, 3))

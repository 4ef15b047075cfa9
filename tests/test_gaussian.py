"""Gaussian diffusion: forward process and posterior against diffusers' DDPM scheduler, the learned
variance, the vb term and hybrid loss, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from latentdit.diffusion import GaussianDiffusion, create_diffusion, get_betas
from latentdit.errors import LatentDiTError

try:
    from diffusion_helpers import DIFFUSERS_SCHEDULE, F64, SHAPE, ddpm_scheduler, randn
except ImportError:  # run as the tests package
    from tests.diffusion_helpers import DIFFUSERS_SCHEDULE, F64, SHAPE, ddpm_scheduler, randn




@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_q_sample_matches_add_noise(schedule: str) -> None:
    diffusion = create_diffusion(noise_schedule=schedule, learn_sigma=False)
    ref = ddpm_scheduler(schedule, "fixed_small")
    x0, noise = randn(*SHAPE, seed=0), randn(*SHAPE, seed=1)
    t = torch.tensor([0, 417, 999])
    ours = diffusion.q_sample(x0, t, noise)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref.add_noise(x0, noise, t), rtol=1e-4, atol=1e-5)


def test_predict_x0_inverts_q_sample() -> None:
    diffusion = create_diffusion(learn_sigma=False)
    x0, noise = randn(*SHAPE, seed=0, dtype=torch.float64), randn(*SHAPE, seed=1, dtype=torch.float64)
    t = torch.tensor([0, 500, 999])
    x_t = diffusion.q_sample(x0, t, noise)
    torch.testing.assert_close(diffusion.predict_x0_from_eps(x_t, t, noise), x0, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(diffusion.predict_eps_from_x0(x_t, t, x0), noise, rtol=1e-7, atol=1e-9)


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
def test_posterior_matchesddpm_scheduler(schedule: str, variance_type: str) -> None:
    diffusion = create_diffusion(noise_schedule=schedule, learn_sigma=False, sigma_small=variance_type == "fixed_small")
    assert diffusion.model_var_type == variance_type
    ref = _in_float64(DDPMScheduler(num_train_timesteps=1000, beta_schedule=DIFFUSERS_SCHEDULE[schedule],
                                    variance_type=variance_type, clip_sample=False, prediction_type="sample"))
    x0, x_t = randn(*SHAPE, seed=2, dtype=F64), randn(*SHAPE, seed=3, dtype=F64)
    for t in [0, 1, 10, 500, 998, 999]:
        tt = torch.full((SHAPE[0],), t)
        mean, var, log_var = diffusion.q_posterior_mean_variance(x0, x_t, tt)
        torch.testing.assert_close(mean, _diffusers_posterior_mean(ref, x0, t, x_t), rtol=1e-5, atol=2e-6)
        ref_small = ref._get_variance(t, variance_type="fixed_small").double().item()
        assert var.flatten().double().numpy() == pytest.approx(ref_small, rel=1e-6, abs=1e-15)
        # The model posterior from the eps that reproduces x0 has the same mean.
        eps = diffusion.predict_eps_from_x0(x_t, tt, x0)
        out = diffusion.p_mean_variance(eps, x_t, tt)
        torch.testing.assert_close(out["mean"], mean, rtol=1e-7, atol=1e-9)
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





def test_learned_range_endpoints() -> None:
    diffusion = create_diffusion(learn_sigma=True)
    x_t, eps = randn(*SHAPE, seed=22), randn(*SHAPE, seed=23)
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
    x0, noise = randn(*SHAPE, seed=24, dtype=torch.float64), randn(*SHAPE, seed=25, dtype=torch.float64)
    output = torch.cat([randn(*SHAPE, seed=26, dtype=torch.float64),
                        torch.tanh(randn(*SHAPE, seed=27, dtype=torch.float64))], dim=1)
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
        assert losses["vb"][row].item() == pytest.approx(expected_vb.item(), rel=1e-7, abs=1e-10)
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
    noise = randn(*shape, seed=28, dtype=torch.float64)
    # eps far from the noise for some samples: the model mean lies many stds away, where the floor acts
    eps = noise + 6.0 * randn(*shape, seed=29, dtype=torch.float64) * torch.tensor([0.0, 0.1, 1.0, 3.0]).reshape(4, 1, 1, 1)
    output = torch.cat([eps, torch.tanh(randn(*shape, seed=30, dtype=torch.float64))], 1)
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
    # below + above − 1 cancels: an ulp of tanh (CPU kernels differ) shows at ~1e-9 relative
    torch.testing.assert_close(vb, expected, rtol=1e-7, atol=1e-9)
    exact = -_exact_decoder_log_likelihood(x0, mean, 0.5 * log_var).mean(dim=(1, 2, 3)) / math.log(2.0)
    assert (vb - exact).abs().max().item() > 1.0  # the floor matters for the far-off samples


def test_hybrid_loss_stops_gradient_through_the_mean() -> None:
    diffusion = create_diffusion(learn_sigma=True)
    x0, noise = randn(*SHAPE, seed=30), randn(*SHAPE, seed=31)
    output = torch.cat([randn(*SHAPE, seed=32), 0.5 * torch.tanh(randn(*SHAPE, seed=33))], 1).requires_grad_(True)
    losses = diffusion.training_losses(lambda x, tm: output, x0, torch.tensor([0, 10, 900]), noise=noise)
    (grad_vb,) = torch.autograd.grad(losses["vb"].sum(), output, retain_graph=True)
    assert torch.all(grad_vb[:, :4] == 0) and torch.any(grad_vb[:, 4:] != 0)
    (grad_mse,) = torch.autograd.grad(losses["mse"].sum(), output)
    assert torch.all(grad_mse[:, 4:] == 0) and torch.any(grad_mse[:, :4] != 0)


def test_fixed_variance_loss_is_plain_mse() -> None:
    diffusion = create_diffusion(learn_sigma=False)
    x0, noise, eps = randn(*SHAPE, seed=34), randn(*SHAPE, seed=35), randn(*SHAPE, seed=36)
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

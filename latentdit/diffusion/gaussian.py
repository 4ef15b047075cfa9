"""Gaussian diffusion with an eps-predicting model: forward process, posterior, model posterior, losses.

Schedule arrays are kept as float64 numpy; per-sample values are gathered by timestep in float64 and
only then cast to the working dtype (float32, or float64 when the inputs are float64).

Timesteps given to every method here are indices of *this* diffusion (0 … num_timesteps-1). A
respaced diffusion (see :mod:`latentdit.diffusion.respace`) keeps a ``timestep_map`` from its
indices to the original training indices; :meth:`GaussianDiffusion.model_timesteps` applies it, and
:meth:`GaussianDiffusion.training_losses` and the samplers call the model with mapped timesteps only,
so a model never sees respaced indices.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from latentdit.errors import LatentDiTError

MODEL_VAR_TYPES = ("learned_range", "fixed_small", "fixed_large")

# Discretised decoder: the data is treated as 8-bit values scaled to [-1, 1], i.e. bins of width 2/255.
_HALF_BIN = 1.0 / 255.0
_EDGE = 0.999
_LOG_FLOOR = 1e-12


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """Elementwise KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) in nats."""
    return 0.5 * (logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2) - 1.0)


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """The tanh approximation of the standard normal CDF, 0.5·(1 + tanh(√(2/π)·(x + 0.044715·x³)))."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """Elementwise log-probability of ``x`` (in [-1, 1]) under N(mean, exp(log_scale)²) integrated over
    the 2/255-wide bin around x; the outermost bins (x < -0.999, x > 0.999) extend to ±infinity.

    This is the released DiT / ADM training loss at t = 0, kept number for number: the normal CDF is
    the tanh approximation (:func:`approx_standard_normal_cdf`, up to 1.8e-4 off the exact CDF) and
    every probability is floored at 1e-12 before its log. The exact CDF would be more accurate but
    would change the vb term of published training runs, so fidelity wins here.
    """
    inv_std = torch.exp(-log_scale)
    cdf_upper = approx_standard_normal_cdf((x - mean + _HALF_BIN) * inv_std)
    cdf_lower = approx_standard_normal_cdf((x - mean - _HALF_BIN) * inv_std)
    log_cdf_upper = torch.log(cdf_upper.clamp(min=_LOG_FLOOR))              # log P(z <= upper)
    log_sf_lower = torch.log((1.0 - cdf_lower).clamp(min=_LOG_FLOOR))       # log P(z > lower)
    log_mass = torch.log((cdf_upper - cdf_lower).clamp(min=_LOG_FLOOR))
    return torch.where(x < -_EDGE, log_cdf_upper, torch.where(x > _EDGE, log_sf_lower, log_mass))


def _mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over all dimensions but the first (batch)."""
    return x.mean(dim=tuple(range(1, x.ndim))) if x.ndim > 1 else x


class GaussianDiffusion:
    """Discrete-time Gaussian diffusion for a model predicting eps (and, with ``learned_range``, a
    per-element interpolation v in [-1, 1] between the log posterior variance and log beta).

    ``model_var_type``:
      * ``fixed_small`` — variance = posterior variance beta~_t (its log clipped at t = 0 by using
        beta~_1, since beta~_0 = 0);
      * ``fixed_large`` — variance = beta_t, with beta~_1 in place of beta_0 at t = 0;
      * ``learned_range`` — log variance = f·log beta_t + (1 - f)·log beta~_t (clipped), f = (v + 1) / 2,
        where v is the second half of the model's output channels.
    """

    def __init__(self, betas: Sequence[float] | np.ndarray, model_var_type: str = "learned_range",
                 timestep_map: Sequence[int] | np.ndarray | None = None) -> None:
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or betas.size == 0:
            raise LatentDiTError(f"betas must be a non-empty 1-D array, got shape {betas.shape}")
        if not np.all(np.isfinite(betas)) or np.any(betas <= 0) or np.any(betas > 1):
            raise LatentDiTError("betas must all lie in (0, 1]")
        if model_var_type not in MODEL_VAR_TYPES:
            raise LatentDiTError(f"unknown model_var_type {model_var_type!r}; expected one of "
                                 f"{', '.join(MODEL_VAR_TYPES)}")
        self.betas = betas
        self.model_var_type = model_var_type
        self.num_timesteps = int(betas.shape[0])
        if timestep_map is None:
            timestep_map = np.arange(self.num_timesteps)
        timestep_map = np.asarray(timestep_map)
        if timestep_map.shape != (self.num_timesteps,) or not np.issubdtype(timestep_map.dtype, np.integer):
            raise LatentDiTError(f"timestep_map must hold {self.num_timesteps} integer indices (one per beta), "
                                 f"got shape {timestep_map.shape} dtype {timestep_map.dtype}")
        self.timestep_map = timestep_map.astype(np.int64)

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1.0)

        # q(x_{t-1} | x_t, x_0) = N(coef1·x_0 + coef2·x_t, beta~_t)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # beta~_0 is 0: replace it by beta~_1 inside the log (beta_0 if there is a single step).
        first = self.posterior_variance[1] if self.num_timesteps > 1 else betas[0]
        self.posterior_log_variance_clipped = np.log(np.append(first, self.posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        self.log_betas = np.log(betas)
        large = np.append(first, betas[1:])
        self.large_variance = large
        self.large_log_variance = np.log(large)

        self._tables: dict[tuple[str, str], torch.Tensor] = {}

    # ------------------------------------------------------------------ helpers

    def __repr__(self) -> str:
        respaced = not np.array_equal(self.timestep_map, np.arange(self.num_timesteps))
        return (f"GaussianDiffusion(num_timesteps={self.num_timesteps}, model_var_type={self.model_var_type!r}"
                f"{', respaced' if respaced else ''})")

    def _table(self, name: str, device: torch.device) -> torch.Tensor:
        """A schedule array as a tensor on ``device`` (float64; int64 for the timestep map), cached."""
        # MPS has no float64: keep those tables on the CPU and gather there.
        dev = torch.device("cpu") if device.type == "mps" else device
        key = (name, str(dev))
        if key not in self._tables:
            self._tables[key] = torch.from_numpy(np.ascontiguousarray(getattr(self, name))).to(dev)
        return self._tables[key]

    def gather(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``array[t]`` gathered in float64, cast to the working dtype of ``like``, shaped [N, 1, …, 1]."""
        t = self.as_index(t, like)
        table = self._table(name, t.device)
        values = table[t.to(table.device)]
        dtype = torch.promote_types(like.dtype, torch.float32) if like.is_floating_point() else torch.float32
        values = values.to(device=like.device, dtype=dtype)
        return values.reshape(values.shape + (1,) * (like.ndim - values.ndim))

    def as_index(self, t: torch.Tensor | int, like: torch.Tensor) -> torch.Tensor:
        """Timesteps as int64 indices, one per sample of ``like`` (a number or a 0-d tensor is broadcast)."""
        if not torch.is_tensor(t):
            t = torch.full((like.shape[0],), int(t), dtype=torch.long, device=like.device)
        if t.is_floating_point() or t.dtype == torch.bool:
            raise LatentDiTError(f"timesteps must be an integer tensor of indices, got dtype {t.dtype}")
        if t.ndim == 0:
            t = t.expand(like.shape[0])
        return t.long()

    def model_timesteps(self, t: torch.Tensor | int) -> torch.Tensor:
        """Map indices of this diffusion to the original training indices the model is conditioned on."""
        if not torch.is_tensor(t):
            t = torch.tensor(int(t), dtype=torch.long)
        table = self._table("timestep_map", t.device)
        return table[t.long().to(table.device)].to(t.device)

    def split_model_output(self, model_output: torch.Tensor, x_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(eps, v): eps is the first C channels; v the next C when the variance is learned, else None.

        With a fixed variance a 2C-channel output (a model trained with learned sigma) is accepted and
        its second half ignored.
        """
        c = x_t.shape[1]
        out_c = model_output.shape[1] if model_output.ndim > 1 else -1
        if model_output.shape[0] != x_t.shape[0] or model_output.shape[2:] != x_t.shape[2:] or out_c not in (c, 2 * c):
            raise LatentDiTError(f"model output shape {tuple(model_output.shape)} does not fit x_t of shape "
                                 f"{tuple(x_t.shape)}: expected {c} or {2 * c} channels with the same batch and size")
        if self.model_var_type == "learned_range":
            if out_c != 2 * c:
                raise LatentDiTError(f"model_var_type 'learned_range' needs {2 * c} output channels "
                                     f"(eps and variance), got {out_c}; use a model with learn_sigma=True")
            return model_output[:, :c], model_output[:, c:]
        return model_output[:, :c], None

    # ------------------------------------------------------------------ forward process and posterior

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor | int, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x_0) = sqrt(abar_t)·x_0 + sqrt(1 - abar_t)·noise."""
        if noise is None:
            noise = torch.randn_like(x0)
        if noise.shape != x0.shape:
            raise LatentDiTError(f"noise shape {tuple(noise.shape)} differs from x0 shape {tuple(x0.shape)}")
        return (self.gather("sqrt_alphas_cumprod", t, x0) * x0
                + self.gather("sqrt_one_minus_alphas_cumprod", t, x0) * noise)

    def q_posterior_mean_variance(self, x0: torch.Tensor, x_t: torch.Tensor,
                                  t: torch.Tensor | int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x_0); variances are [N, 1, …, 1]."""
        mean = (self.gather("posterior_mean_coef1", t, x_t) * x0
                + self.gather("posterior_mean_coef2", t, x_t) * x_t)
        var = self.gather("posterior_variance", t, x_t)
        log_var = self.gather("posterior_log_variance_clipped", t, x_t)
        return mean, var, log_var

    def predict_x0_from_eps(self, x_t: torch.Tensor, t: torch.Tensor | int, eps: torch.Tensor) -> torch.Tensor:
        """x_0 = (x_t - sqrt(1 - abar_t)·eps) / sqrt(abar_t)."""
        return (self.gather("sqrt_recip_alphas_cumprod", t, x_t) * x_t
                - self.gather("sqrt_recipm1_alphas_cumprod", t, x_t) * eps)

    def predict_eps_from_x0(self, x_t: torch.Tensor, t: torch.Tensor | int, x0: torch.Tensor) -> torch.Tensor:
        """eps = (x_t / sqrt(abar_t) - x_0) / sqrt(1/abar_t - 1)."""
        return ((self.gather("sqrt_recip_alphas_cumprod", t, x_t) * x_t - x0)
                / self.gather("sqrt_recipm1_alphas_cumprod", t, x_t))

    # ------------------------------------------------------------------ model posterior

    def p_mean_variance(self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor | int,
                        clip_denoised: bool = False) -> dict[str, torch.Tensor]:
        """p(x_{t-1} | x_t) from a model output: dict(mean, variance, log_variance, pred_x0, eps).

        All values have the shape of ``x_t``; ``pred_x0`` is clamped to [-1, 1] when ``clip_denoised``.
        """
        model_output = model_output.to(x_t.dtype) if x_t.is_floating_point() else model_output
        eps, v = self.split_model_output(model_output, x_t)
        if self.model_var_type == "learned_range":
            min_log = self.gather("posterior_log_variance_clipped", t, x_t)
            max_log = self.gather("log_betas", t, x_t)
            frac = (v + 1.0) / 2.0
            log_variance = frac * max_log + (1.0 - frac) * min_log
            variance = torch.exp(log_variance)
        elif self.model_var_type == "fixed_small":
            variance = self.gather("posterior_variance", t, x_t).expand_as(x_t)
            log_variance = self.gather("posterior_log_variance_clipped", t, x_t).expand_as(x_t)
        else:
            variance = self.gather("large_variance", t, x_t).expand_as(x_t)
            log_variance = self.gather("large_log_variance", t, x_t).expand_as(x_t)
        pred_x0 = self.predict_x0_from_eps(x_t, t, eps)
        if clip_denoised:
            pred_x0 = pred_x0.clamp(-1.0, 1.0)
        mean, _, _ = self.q_posterior_mean_variance(pred_x0, x_t, t)
        return {"mean": mean, "variance": variance, "log_variance": log_variance, "pred_x0": pred_x0, "eps": eps}

    # ------------------------------------------------------------------ losses

    def vb_terms_bpd(self, model_output: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor,
                     t: torch.Tensor | int) -> torch.Tensor:
        """Per-sample variational-bound term in bits per dimension: KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t))
        for t > 0 and the discretised Gaussian decoder NLL of x_0 for t == 0."""
        t = self.as_index(t, x_t)
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x0, x_t, t)
        out = self.p_mean_variance(model_output, x_t, t)
        kl = _mean_flat(normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"])) / math.log(2.0)
        nll = -_mean_flat(discretized_gaussian_log_likelihood(x0, out["mean"], 0.5 * out["log_variance"]))
        nll = nll / math.log(2.0)
        return torch.where(t.to(kl.device) == 0, nll, kl)

    def training_losses(self, model_fn: Callable[..., torch.Tensor], x0: torch.Tensor, t: torch.Tensor,
                        noise: torch.Tensor | None = None,
                        model_kwargs: Mapping[str, Any] | None = None) -> dict[str, torch.Tensor]:
        """Per-sample losses for a batch: dict(loss, mse, vb), each of shape [N].

        ``model_fn(x_t, t_model, **model_kwargs)`` is called with ``t`` mapped to original indices.
        mse = mean over non-batch dims of (eps - noise)²; with ``learned_range`` the hybrid loss adds
        the vb term, computed with the eps prediction detached so the bound trains only the variance.
        With a fixed variance vb is zero and loss = mse.
        """
        t, noise, x_t = self.noised_input(x0, t, noise)
        model_output = model_fn(x_t, self.model_timesteps(t), **dict(model_kwargs or {}))
        return self.losses_from_output(model_output, x0, x_t, t, noise)

    def noised_input(self, x0: torch.Tensor, t: torch.Tensor,
                     noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(t, noise, x_t)`` of a training step: ``t`` checked (one index per sample), ``noise`` drawn
        when not given, ``x_t = q_sample(x0, t, noise)``."""
        t = self.as_index(t, x0)
        if t.shape != (x0.shape[0],):
            raise LatentDiTError(f"t must hold one timestep per sample ({x0.shape[0]}), got shape {tuple(t.shape)}")
        if noise is None:
            noise = torch.randn_like(x0)
        return t, noise, self.q_sample(x0, t, noise)

    def losses_from_output(self, model_output: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor,
                           t: torch.Tensor, noise: torch.Tensor) -> dict[str, torch.Tensor]:
        """The losses of :meth:`training_losses` given the model's output at ``x_t = q_sample(x0, t, noise)``."""
        t = self.as_index(t, x0)
        model_output = model_output.to(x_t.dtype)
        eps, v = self.split_model_output(model_output, x_t)
        mse = _mean_flat((noise - eps) ** 2)
        if v is not None:
            frozen = torch.cat([eps.detach(), v], dim=1)
            vb = self.vb_terms_bpd(frozen, x0, x_t, t)
        else:
            vb = torch.zeros_like(mse)
        return {"loss": mse + vb, "mse": mse, "vb": vb}

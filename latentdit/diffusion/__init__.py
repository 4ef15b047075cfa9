"""Gaussian diffusion: noise schedules, forward process and losses, timestep respacing, samplers."""

from latentdit.diffusion.gaussian import GaussianDiffusion, discretized_gaussian_log_likelihood, normal_kl
from latentdit.diffusion.respace import create_diffusion, respace_betas, space_timesteps
from latentdit.diffusion.samplers import ddim_sample, ddim_step, ddpm_sample, ddpm_step
from latentdit.diffusion.schedules import get_betas

__all__ = [
    "GaussianDiffusion",
    "create_diffusion",
    "ddim_sample",
    "ddim_step",
    "ddpm_sample",
    "ddpm_step",
    "discretized_gaussian_log_likelihood",
    "get_betas",
    "normal_kl",
    "respace_betas",
    "space_timesteps",
]

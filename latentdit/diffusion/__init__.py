"""Training processes (Gaussian diffusion, flow matching): schedules, forward process and losses,
timestep respacing, samplers."""

from latentdit.diffusion.flow import FLOW_MODEL_TIME_SCALE, FlowProcess
from latentdit.diffusion.gaussian import GaussianDiffusion, discretized_gaussian_log_likelihood, normal_kl
from latentdit.diffusion.process import (
    META_PROCESS,
    PROCESSES,
    DDPMProcess,
    Process,
    build_process,
    process_from_metadata,
)
from latentdit.diffusion.respace import create_diffusion, respace_betas, space_timesteps
from latentdit.diffusion.samplers import ddim_sample, ddim_step, ddpm_sample, ddpm_step
from latentdit.diffusion.schedules import get_betas

__all__ = [
    "DDPMProcess",
    "FLOW_MODEL_TIME_SCALE",
    "FlowProcess",
    "GaussianDiffusion",
    "META_PROCESS",
    "PROCESSES",
    "Process",
    "build_process",
    "create_diffusion",
    "ddim_sample",
    "ddim_step",
    "ddpm_sample",
    "ddpm_step",
    "discretized_gaussian_log_likelihood",
    "get_betas",
    "normal_kl",
    "process_from_metadata",
    "respace_betas",
    "space_timesteps",
]

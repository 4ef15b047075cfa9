"""Training processes (Gaussian diffusion, flow matching) behind one interface
(:class:`latentdit.diffusion.base.Process`): schedules, forward process and losses, timestep
respacing, samplers."""

from latentdit.diffusion.base import Process
from latentdit.diffusion.flow import FLOW_MODEL_TIME_SCALE, FlowGrid, FlowProcess, flow_grid
from latentdit.diffusion.gaussian import GaussianDiffusion, discretized_gaussian_log_likelihood, normal_kl
from latentdit.diffusion.process import (
    META_PROCESS,
    PROCESS_TYPES,
    PROCESSES,
    DDPMProcess,
    build_process,
    process_from_metadata,
)
from latentdit.diffusion.respace import create_diffusion, respace_betas, space_timesteps
from latentdit.diffusion.samplers import (
    SAMPLERS,
    GeneratorNoise,
    NoiseSource,
    PerSampleNoise,
    ddim_step,
    ddpm_step,
    make_dpm_solver,
    sample_ddim,
    sample_ddpm,
    sample_dpm_solver,
    sample_euler,
    sample_ab2,
    sample_dpm_2m,
    sample_euler_maruyama,
    sample_heun,
)
from latentdit.diffusion.schedules import get_betas

__all__ = [
    "DDPMProcess",
    "FLOW_MODEL_TIME_SCALE",
    "FlowGrid",
    "FlowProcess",
    "GaussianDiffusion",
    "GeneratorNoise",
    "META_PROCESS",
    "NoiseSource",
    "PROCESSES",
    "PROCESS_TYPES",
    "PerSampleNoise",
    "Process",
    "SAMPLERS",
    "build_process",
    "create_diffusion",
    "ddim_step",
    "ddpm_step",
    "discretized_gaussian_log_likelihood",
    "flow_grid",
    "get_betas",
    "make_dpm_solver",
    "normal_kl",
    "process_from_metadata",
    "respace_betas",
    "sample_ddim",
    "sample_ddpm",
    "sample_dpm_solver",
    "sample_euler",
    "sample_ab2",
    "sample_dpm_2m",
    "sample_euler_maruyama",
    "sample_heun",
    "space_timesteps",
]

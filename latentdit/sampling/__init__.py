"""Guided sampling from a DiT, apart from checkpoint loading (:mod:`latentdit.weights`) and command-line
plumbing (:mod:`latentdit.cli.sampling`):

- :mod:`~latentdit.sampling.settings`: :class:`SamplerSettings` as given, :class:`ResolvedSettings` checked
  against the model's process (DDPM: ddpm, ddim, dpm-solver; flow: euler, heun, ab2, dpm-2m, euler-maruyama);
- :mod:`~latentdit.sampling.guidance`: the model function with classifier-free guidance (cond and uncond
  halves in one batched forward), optionally inside a guidance interval and on the first k channels;
- :mod:`~latentdit.sampling.autoguidance`: guidance by a weaker model (:class:`Guide`) instead of the
  unconditional branch;
- :mod:`~latentdit.sampling.internal`: Internal Guidance, by the model's own internal head;
- :mod:`~latentdit.sampling.noise`: per-sample noise seeded by (seed, sample index);
- :mod:`~latentdit.sampling.run`: :func:`sample_latents` (one batch), :func:`sample_seeded` (in batches);
- :mod:`~latentdit.sampling.trajectory`: x_t and x̂0 recorded through the sampler's callback;
- :mod:`~latentdit.sampling.images`: latents → images, uint8, PNG files;
- :mod:`~latentdit.sampling.labels`: the default classes to show, label text.

Many-sample bookkeeping (chunk files, the ``.npz``) lives in :mod:`latentdit.sample_store`.
"""

from latentdit.sampling.autoguidance import Guide
from latentdit.sampling.guidance import make_model_fn
from latentdit.sampling.images import decode_images, decode_to_uint8, images_to_uint8, save_individual_pngs
from latentdit.sampling.internal import has_internal_head
from latentdit.sampling.labels import default_labels, label_text
from latentdit.sampling.noise import per_sample_noise, sample_generator
from latentdit.sampling.run import resolve_settings, sample_latents, sample_seeded
from latentdit.sampling.settings import DDIM_MAPS, DEFAULT_NUM_STEPS, SAMPLERS, ResolvedSettings, SamplerSettings
from latentdit.sampling.trajectory import record_trajectory, save_denoising_trajectory, trajectory_steps

__all__ = [
    "DDIM_MAPS",
    "DEFAULT_NUM_STEPS",
    "Guide",
    "ResolvedSettings",
    "SAMPLERS",
    "SamplerSettings",
    "decode_images",
    "decode_to_uint8",
    "default_labels",
    "has_internal_head",
    "images_to_uint8",
    "label_text",
    "make_model_fn",
    "per_sample_noise",
    "record_trajectory",
    "resolve_settings",
    "sample_generator",
    "sample_latents",
    "sample_seeded",
    "save_denoising_trajectory",
    "save_individual_pngs",
    "trajectory_steps",
]

"""Running a sampler of :mod:`latentdit.diffusion.samplers` on a DiT: :func:`sample_latents` for one
batch, :func:`sample_seeded` in batches with per-sample noise (the result does not depend on the batch
split or the number of processes)."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from latentdit.diffusion import DDPMProcess, Process
from latentdit.diffusion.samplers import SAMPLERS as SAMPLER_SPECS
from latentdit.diffusion.samplers import Callback, GeneratorNoise, NoiseSource
from latentdit.errors import LatentDiTError
from latentdit.models.guidance import check_guidance_possible
from latentdit.sampling.autoguidance import check_guide_model
from latentdit.sampling.guidance import guidance_test, make_model_fn
from latentdit.sampling.internal import has_internal_head
from latentdit.sampling.noise import per_sample_noise
from latentdit.sampling.settings import ResolvedSettings, SamplerSettings


def resolve_settings(settings: SamplerSettings | ResolvedSettings | None, process: Process | None,
                     in_channels: int, internal_head: bool = False) -> ResolvedSettings:
    """``settings`` resolved for ``process`` (None: DDPM, 1000 linear steps — released DiT); resolved
    settings are taken as they are (``process``, when given, must be the one they were resolved for)."""
    if isinstance(settings, ResolvedSettings):
        if process is not None and process is not settings.process:
            raise LatentDiTError(f"the sampler settings were resolved for {settings.process!r}, not for {process!r}")
        return settings
    return (settings or SamplerSettings()).resolved(process if process is not None else DDPMProcess(), in_channels,
                                                    internal_head=internal_head)


@torch.no_grad()
def sample_latents(model: torch.nn.Module, labels: Sequence[int] | torch.Tensor,
                   settings: SamplerSettings | ResolvedSettings | None = None, *, process: Process | None = None,
                   noise: NoiseSource | torch.Generator | None = None, x_T: torch.Tensor | None = None,
                   device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                   progress: bool = False, callback: Callback | None = None) -> torch.Tensor:
    """Sample latents for ``labels`` (scaled, as the model sees them), float32 [N, C, H, W] on ``device``.

    ``settings`` and ``process`` as :func:`resolve_settings` takes them (``process``: the model's training
    process). ``noise``: where the initial x_T (unless ``x_T`` is given) and the step noise of stochastic
    samplers come from — a :class:`NoiseSource` (e.g. :func:`latentdit.sampling.per_sample_noise`) or a
    generator for the whole batch (None: torch's global generator). ``dtype`` fp16/bf16 enables autocast
    on CUDA (ignored on CPU). ``callback`` goes to the sampler (see :mod:`latentdit.diffusion.samplers`).
    """
    in_ch = int(model.in_channels)
    settings = resolve_settings(settings, process, in_ch, has_internal_head(model))
    process = settings.process
    expected = process.out_channels(in_ch, bool(model.learn_sigma))
    if expected != int(model.out_channels):
        raise LatentDiTError(f"the model has {model.out_channels} output channels, but the {process.name} process "
                             f"expects {expected}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    y = torch.as_tensor(list(labels) if not torch.is_tensor(labels) else labels, dtype=torch.long).reshape(-1)
    if y.numel() == 0:
        raise LatentDiTError("no labels to sample")
    if int(y.min()) < 0 or int(y.max()) >= model.num_classes:
        raise LatentDiTError(f"labels must be class ids in 0..{model.num_classes - 1}, got {y.tolist()}")
    check_guidance_possible(model, settings.cfg_scale)
    guide = settings.guide
    if guide is not None:
        check_guide_model(model, guide)
    y = y.to(device)
    shape = (y.numel(), in_ch, int(model.input_size), int(model.input_size))
    if not isinstance(noise, NoiseSource):
        noise = GeneratorNoise(noise)
    if x_T is None:
        x_T = noise.draw(shape, device)
    elif tuple(x_T.shape) != shape:
        raise LatentDiTError(f"initial noise has shape {tuple(x_T.shape)}, expected {shape}")
    x_T = x_T.to(device=device, dtype=torch.float32)

    grid = settings.grid(bool(model.learn_sigma))
    models = [model] if guide is None else [model, guide.model]
    was_training = [m.training for m in models]
    for m in models:
        m.eval()
    model_fn = make_model_fn(model, y, cfg_scale=settings.cfg_scale, guided_channels=settings.guided_channels,
                             guide_at=guidance_test(process, settings.guidance_interval), dtype=dtype,
                             guide_model=guide.model if guide is not None else None,
                             guide_scale=settings.guide_scale,
                             autoguide_at=guidance_test(process, settings.guide_interval),
                             internal_scale=settings.internal_scale,
                             internal_at=guidance_test(process, settings.internal_interval))
    try:
        out = SAMPLER_SPECS[settings.sampler].fn(model_fn, x_T, grid, noise=noise, callback=callback,
                                                 progress=progress)
    finally:
        for m, mode in zip(models, was_training):
            m.train(mode)
    return out.float()


def sample_seeded(model: torch.nn.Module, labels: Sequence[int],
                  settings: SamplerSettings | ResolvedSettings | None = None, *, seed: int, first_index: int = 0,
                  batch_size: int = 32, progress: bool = False, **sampling_kwargs: Any) -> torch.Tensor:
    """Sample ``labels`` in batches; sample ``first_index + j`` takes its initial and step noise from
    :func:`latentdit.sampling.noise.sample_generator` ``(seed, first_index + j)``, so each sample depends
    only on ``seed`` and its index — not on ``batch_size`` nor on which process runs it. Extra keyword
    arguments (``process``, ``device``, ``dtype``, ``callback``) go to :func:`sample_latents`. Returns
    latents on CPU.
    """
    if batch_size < 1:
        raise LatentDiTError(f"batch size must be ≥ 1, got {batch_size}")
    labels = [int(v) for v in labels]
    out = []
    starts = range(0, len(labels), batch_size)
    if progress and len(starts) > 1:
        from tqdm.auto import tqdm
        starts = tqdm(starts, desc="batches", leave=False)
    for s in starts:
        idx = list(range(first_index + s, first_index + min(s + batch_size, len(labels))))
        lat = sample_latents(model, labels[s:s + len(idx)], settings, noise=per_sample_noise(seed, idx),
                             **sampling_kwargs)
        out.append(lat.cpu())
    return torch.cat(out)

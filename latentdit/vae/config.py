"""The VAE training configuration (``tools/train_vae.py``, ``configs/vae_*.yaml``): sections ``data``,
``model``, ``loss`` and ``train``, loaded like the DiT run's (:mod:`latentdit.typed_config`)."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

from latentdit import typed_config

VAE_RECON_LOSSES = ("l1", "l2")


@dataclass
class VAEDataConfig:
    """Training images (what ``tools/extract.py --data`` takes) and the held-out split."""

    source: str = "fashion-mnist"   # "fashion-mnist", an ImageNet-layout folder or a flat folder
    image_size: int = 64
    crop_size: int = 32             # random training crops (the model is fully convolutional); 0 = whole image
    val_fraction: float = 0.01      # held out by a seeded permutation when the data has no val/ split
    split_seed: int = 0             # seed of that permutation (independent of train.seed)
    max_train_images: int = 0       # 0 = every training image
    num_workers: int = 0            # loader processes for the one-off decode of the images


@dataclass
class VAEModelConfig:
    """The diffusers ``AutoencoderKL`` (KL-f8 with 4 latent channels by default)."""

    block_out_channels: list[int] = field(default_factory=lambda: [32, 64, 64, 64])
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 8        # 4-8 channels per group; one per group (32 on 32 channels) acts as an instance
                                    # norm: flat colour and the image's level are lost (see configs/vae_*.yaml)
    mid_block_add_attention: bool = False
    init_from: str = ""             # a VAE (bundled name, folder, hub id) whose weights start the run


@dataclass
class VAELossConfig:
    """Reconstruction + KL, optional frequency and colour terms, and a PatchGAN hinge loss after ``disc_start``."""

    recon: str = "l1"
    kl_weight: float = 1e-6         # on the KL summed per image, relative to the summed reconstruction loss
    fft_weight: float = 0.0         # L1 between 2-D spectra (orthonormal FFT), relative to the reconstruction
    lab_weight: float = 0.0         # L1 between CIELAB images / 100 (L's range), relative to the reconstruction
    disc_start: int = 0             # first step with the GAN term and discriminator updates
    disc_weight: float = 0.0        # 0: no discriminator; else factor on the adaptive weight
    disc_max_weight: float = 1e4    # clamp of the adaptive weight
    disc_layers: int = 3            # stride-2 layers of the PatchGAN
    disc_channels: int = 64


@dataclass
class VAEOptimConfig:
    """Optimisation and bookkeeping of a VAE run. Step counts are optimizer steps."""

    steps: int = 1500
    batch_size: int = 32
    lr: float = 1e-3
    disc_lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 100
    min_lr_ratio: float = 0.05      # cosine decay ends at lr * min_lr_ratio
    grad_clip: float = 1.0          # 0 disables
    seed: int = 0
    sample_every: int = 250         # reconstruction grid of held-out images (0 disables)
    ckpt_every: int = 250
    keep_last: int = 2
    stats_images: int = 2048        # training images whose latents give the scaling factor and per-channel stats
    eval_images: int = 1000         # held-out images for the PSNR in the model card
    eval_check_images: int = 256    # smaller subset whose PSNR the test suite re-checks
    log_every: int = 10             # metrics.jsonl / TensorBoard row every this many steps
    tensorboard: bool = True
    max_minutes: float = 0.0        # time budget (0 = none): checkpoint, then export, when it runs out


@dataclass
class VAEConfig:
    """The whole resolved VAE training configuration."""

    data: VAEDataConfig = field(default_factory=VAEDataConfig)
    model: VAEModelConfig = field(default_factory=VAEModelConfig)
    loss: VAELossConfig = field(default_factory=VAELossConfig)
    train: VAEOptimConfig = field(default_factory=VAEOptimConfig)
    name: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


VAE_SECTIONS: dict[str, type] = {
    "data": VAEDataConfig,
    "model": VAEModelConfig,
    "loss": VAELossConfig,
    "train": VAEOptimConfig,
}


def load_vae_config(path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> VAEConfig:
    """Load a VAE training config (YAML sections ``data``, ``model``, ``loss``, ``train``), apply
    ``section.field=value`` overrides, validate."""
    return typed_config.load(VAEConfig, VAE_SECTIONS, path, overrides, validate_vae_config)


def vae_config_from_dict(data: Any, source: str = "config") -> VAEConfig:
    """A validated :class:`VAEConfig` from a nested dict (as read from YAML or a run's saved config)."""
    cfg = typed_config.config_from_dict(VAEConfig, VAE_SECTIONS, data, source)
    validate_vae_config(cfg, source)
    return cfg


def validate_vae_config(cfg: VAEConfig, source: str = "config") -> None:
    """Range and choice checks of a VAE training config."""

    def fail(name: str, expected: str, got: Any) -> None:
        raise typed_config.field_error(source, name, expected, got)

    d, m, lo, t = cfg.data, cfg.model, cfg.loss, cfg.train
    if not d.source:
        fail("data.source", "'fashion-mnist' or an image folder", d.source)
    if not m.block_out_channels or any(c < 1 or c % max(1, m.norm_num_groups) for c in m.block_out_channels):
        fail("model.block_out_channels", f"positive multiples of model.norm_num_groups={m.norm_num_groups}",
             m.block_out_channels)
    factor = 2 ** (len(m.block_out_channels) - 1)
    if d.image_size < factor or d.image_size % factor:
        fail("data.image_size", f"a positive multiple of the downsampling factor {factor}", d.image_size)
    if d.crop_size and (d.crop_size % factor or d.crop_size > d.image_size):
        fail("data.crop_size", f"0 or a multiple of {factor} no larger than data.image_size={d.image_size}",
             d.crop_size)
    if not 0.0 <= d.val_fraction < 1.0:
        fail("data.val_fraction", "a fraction in [0, 1)", d.val_fraction)
    for name, v in (("data.split_seed", d.split_seed), ("data.max_train_images", d.max_train_images),
                    ("data.num_workers", d.num_workers), ("loss.disc_start", lo.disc_start),
                    ("train.warmup_steps", t.warmup_steps), ("train.seed", t.seed),
                    ("train.sample_every", t.sample_every)):
        if v < 0:
            fail(name, "an integer >= 0", v)
    for name, v in (("model.layers_per_block", m.layers_per_block), ("model.latent_channels", m.latent_channels),
                    ("model.norm_num_groups", m.norm_num_groups), ("loss.disc_layers", lo.disc_layers),
                    ("loss.disc_channels", lo.disc_channels), ("train.steps", t.steps),
                    ("train.batch_size", t.batch_size), ("train.ckpt_every", t.ckpt_every),
                    ("train.keep_last", t.keep_last), ("train.stats_images", t.stats_images),
                    ("train.eval_images", t.eval_images), ("train.log_every", t.log_every)):
        if v < 1:
            fail(name, "a positive integer", v)
    if lo.recon not in VAE_RECON_LOSSES:
        fail("loss.recon", f"one of {', '.join(VAE_RECON_LOSSES)}", lo.recon)
    for name, v in (("loss.kl_weight", lo.kl_weight), ("loss.fft_weight", lo.fft_weight),
                    ("loss.lab_weight", lo.lab_weight),
                    ("loss.disc_weight", lo.disc_weight), ("loss.disc_max_weight", lo.disc_max_weight),
                    ("train.weight_decay", t.weight_decay), ("train.grad_clip", t.grad_clip),
                    ("train.max_minutes", t.max_minutes)):
        if not math.isfinite(v) or v < 0:
            fail(name, "a finite number >= 0", v)
    for name, v in (("train.lr", t.lr), ("train.disc_lr", t.disc_lr)):
        if not math.isfinite(v) or v <= 0:
            fail(name, "a number > 0", v)
    if not 0.0 <= t.min_lr_ratio <= 1.0:
        fail("train.min_lr_ratio", "a number in [0, 1]", t.min_lr_ratio)
    if not 1 <= t.eval_check_images <= t.eval_images:
        fail("train.eval_check_images", f"an integer in [1, train.eval_images={t.eval_images}]", t.eval_check_images)

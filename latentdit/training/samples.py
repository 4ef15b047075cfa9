"""The periodic sample grid of a DiT run: EMA weights, sampled with guidance, decoded through the run's VAE."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from latentdit.config import Config
from latentdit.seeding import seed_for


class SampleGrid:
    """Periodic EMA sample grid with guidance, sampled with the run's process and decoded through the
    run's VAE (main process only)."""

    def __init__(self, cfg: Config, dataset, model_config: dict[str, Any], process, device: torch.device) -> None:
        self.cfg, self.dataset, self.model_config, self.process, self.device = cfg, dataset, model_config, process, device
        self.model = None
        self.vae = None

    def __call__(self, ema_state: dict[str, torch.Tensor], step: int, path: Path) -> Path:
        from latentdit.models import DiT
        from latentdit.sampling import SamplerSettings, default_labels, sample_latents
        from latentdit.vae import VAE
        from latentdit.visualize import save_labeled_grid

        cfg, ds = self.cfg, self.dataset
        if self.model is None:
            self.model = DiT(**dict(self.model_config, grad_checkpointing=False)).to(self.device).eval()
        if self.vae is None:
            self.vae = VAE.load(ds.vae, device=self.device)
        self.model.load_state_dict(ema_state)
        classes = default_labels(ds.num_classes, cfg.train.sample_num_classes)
        seeds = cfg.train.sample_num_seeds
        y = torch.tensor(classes, device=self.device).repeat_interleave(seeds)
        scale = cfg.train.sample_cfg_scale if cfg.model.class_dropout_prob > 0 else 1.0
        gen = torch.Generator(device=self.device).manual_seed(seed_for("latentdit-sample-grid", cfg.train.seed))
        with torch.no_grad():
            latents = sample_latents(self.model, y, SamplerSettings(num_steps=cfg.diffusion.sample_steps,
                                                                    cfg_scale=scale),
                                     process=self.process, noise=gen)
            images = self.vae.decode(latents, ds.latent_norm)
        names = [ds.class_names[c] if c < len(ds.class_names) else str(c) for c in classes]
        labels = [f"{n} (cfg {scale:g})" if i == 0 else n for i, n in enumerate(names)]
        return save_labeled_grid(images, labels, path, nrow=seeds)

"""One VAE training run's parts and its step: the autoencoder, the discriminator, their optimizers, and
their checkpoints.

Every step's batch, crops, flips and posterior noise come from a generator seeded by
``seed_for(seed, step)`` and drawn for the whole batch; with several processes each trains on its rows of
it and the gradients are averaged (:func:`latentdit.engine.accelerator.average_gradients`), so the
processes hold the same weights after every step. The learning rate is a function of the step
(:func:`latentdit.engine.schedule.lr_at`). A checkpoint holds both networks and both optimizers, so a run
killed at any point and resumed is the uninterrupted run.

Checkpoint files (beside the shared ``state.json`` and ``rng-rank{r}.pt``)::

    vae.safetensors             the AutoencoderKL's weights
    discriminator.safetensors   the PatchGAN's (when there is one)
    optimizer.pt                {"vae": AdamW state, "disc": AdamW state}
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from latentdit.engine.accelerator import average_gradients
from latentdit.engine.checkpoint import OPTIMIZER_FILE, CheckpointManager, read_state, restore_rng_state
from latentdit.engine.optim import build_adamw
from latentdit.engine.schedule import lr_at, set_lr
from latentdit.errors import LatentDiTError
from latentdit.io import load_safetensors, save_safetensors, torch_load, torch_save
from latentdit.vae.config import VAEConfig
from latentdit.vae.training.data import batch_for_step, process_rows, step_generator
from latentdit.vae.training.losses import gan_active, generator_loss, hinge_d_loss
from latentdit.vae.training.networks import PatchDiscriminator, build_autoencoder, build_discriminator

VAE_FILE = "vae.safetensors"
DISC_FILE = "discriminator.safetensors"
#: AdamW betas of the discriminator (the GAN convention of a short memory of the first moment).
DISC_BETAS = (0.5, 0.9)


def posterior_noise(cfg: VAEConfig, g: torch.Generator) -> torch.Tensor:
    """The standard normal noise of the step's posterior samples (the whole batch), drawn from ``g``."""
    m = cfg.model
    side = (cfg.data.crop_size or cfg.data.image_size) // 2 ** (len(m.block_out_channels) - 1)
    return torch.randn((cfg.train.batch_size, m.latent_channels, side, side), generator=g)


@dataclass
class Trainer:
    """The VAE, its discriminator and their optimizers; :meth:`step` runs one training step.
    ``accelerator``: the run's (None: one process on the CPU)."""

    cfg: VAEConfig
    model: Any
    disc: PatchDiscriminator | None
    opt: torch.optim.Optimizer
    disc_opt: torch.optim.Optimizer | None
    accelerator: Any = None

    @classmethod
    def create(cls, cfg: VAEConfig, accelerator=None) -> "Trainer":
        """Build (seeded, or from ``model.init_from``) everything; raises for settings that do not fit."""
        device = torch.device("cpu") if accelerator is None else accelerator.device
        t = cfg.train
        model = build_autoencoder(cfg).to(device).train()
        opt = build_adamw(model, t.lr, weight_decay=t.weight_decay, device=device)
        disc = build_discriminator(cfg)
        disc_opt = None
        if disc is not None:
            disc = disc.to(device).train()
            disc_opt = build_adamw(disc, t.disc_lr, betas=DISC_BETAS, device=device)
        return cls(cfg, model, disc, opt, disc_opt, accelerator)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device if self.accelerator is not None else torch.device("cpu")

    def _rows(self) -> slice:
        acc = self.accelerator
        if acc is None:
            return slice(None)
        return process_rows(self.cfg.train.batch_size, acc.process_index, acc.num_processes)

    def _average(self, module: torch.nn.Module) -> None:
        if self.accelerator is not None:
            average_gradients(self.accelerator, module.parameters())

    def lr(self, step: int) -> float:
        t = self.cfg.train
        return lr_at(step, t.lr, t.warmup_steps, t.steps, t.min_lr_ratio)

    def step(self, images_u8: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        """One optimizer step of the VAE (and, once the GAN is active, of the discriminator); returns the
        loss and its parts on this process's rows."""
        cfg, rows = self.cfg, self._rows()
        g = step_generator(cfg, step)
        x = batch_for_step(images_u8, cfg, g)[rows]
        eps = posterior_noise(cfg, g)[rows]
        x = x.to(self.device).contiguous(memory_format=torch.channels_last)
        set_lr(self.opt, self.lr(step))
        if self.disc is not None:
            self.disc.requires_grad_(False)
        loss, recon, parts = generator_loss(self.model, self.disc, x, eps.to(self.device), cfg, step)
        if not torch.isfinite(loss):
            raise LatentDiTError(f"VAE training loss became {loss.item()} at step {step}; lower train.lr")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self._average(self.model)
        if cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.train.grad_clip)
        self.opt.step()
        parts = {"loss": loss.detach(), **parts}
        if self.disc is not None and gan_active(cfg, step):
            self.disc.requires_grad_(True)
            d_loss = hinge_d_loss(self.disc(x), self.disc(recon.detach()))
            self.disc_opt.zero_grad(set_to_none=True)
            d_loss.backward()
            self._average(self.disc)
            self.disc_opt.step()
            parts["d"] = d_loss.detach()
        return parts

    # ---- checkpoints
    def save(self, manager: CheckpointManager, step: int, record: dict[str, Any]) -> Path:
        """Write the checkpoint of ``step`` with ``record`` in its ``state.json`` (collective)."""

        def write_files(tmp: Path) -> None:
            save_safetensors(self.model.state_dict(), tmp / VAE_FILE)
            optim = {"vae": self.opt.state_dict()}
            if self.disc is not None:
                save_safetensors(self.disc.state_dict(), tmp / DISC_FILE)
                optim["disc"] = self.disc_opt.state_dict()
            torch_save(optim, tmp / OPTIMIZER_FILE)

        state = {"step": step, "model_config": dict(self.model.config), "vae_config": self.cfg.to_dict(), **record}
        return manager.save(self.accelerator, step, write_files, state)

    def load(self, ckpt: Path) -> dict[str, Any]:
        """Restore the checkpoint ``ckpt``; returns its ``state.json``."""
        state = read_state(ckpt, ("step",), "VAE training checkpoint")
        try:
            self.model.load_state_dict(load_safetensors(ckpt / VAE_FILE)[0])
            optim = torch_load(ckpt / OPTIMIZER_FILE, "optimizer state")
            self.opt.load_state_dict(optim["vae"])
            if self.disc is not None:
                self.disc.load_state_dict(load_safetensors(ckpt / DISC_FILE)[0])
                self.disc_opt.load_state_dict(optim["disc"])
        except (KeyError, RuntimeError, ValueError) as e:
            raise LatentDiTError(f"checkpoint {ckpt} does not fit this model/config: {e}") from e
        if self.accelerator is not None:
            restore_rng_state(ckpt, self.accelerator.process_index)
        return state

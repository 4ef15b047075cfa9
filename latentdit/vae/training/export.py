"""The end of a VAE run: latent statistics into the config, ``save_pretrained``, held-out PSNR, model card.

The latents of training images give ``scaling_factor`` (1 / overall std) and the per-channel
``latents_mean`` / ``latents_std`` (diffusers config fields); the model is saved with ``save_pretrained``
(a diffusers ``AutoencoderKL`` folder) beside ``MODEL_CARD.md`` and ``model_card.json``.
"""

from __future__ import annotations

import math
import os
import platform
from pathlib import Path
from typing import Any, Callable

import torch

from latentdit.errors import LatentDiTError
from latentdit.io import sha256_file
from latentdit.seeding import seed_for
from latentdit.colour import reconstruction_delta_e
from latentdit.vae.autoencoder import VAE, psnr
from latentdit.vae.config import VAEConfig
from latentdit.vae.training.card import write_model_card
from latentdit.vae.training.data import ImageSplits, to_model_range


@torch.no_grad()
def latent_statistics(model, images_u8: torch.Tensor, cfg: VAEConfig, batch_size: int = 64) -> dict[str, Any]:
    """Overall and per-channel mean/std of posterior samples of the first ``stats_images`` training images."""
    g = torch.Generator().manual_seed(seed_for("latentdit-vae-stats", cfg.train.seed))
    device = next(model.parameters()).device
    samples = []
    for chunk in images_u8[:cfg.train.stats_images].split(batch_size):
        post = model.encode(to_model_range(chunk).to(device)).latent_dist
        samples.append((post.mean + post.std * torch.randn(post.mean.shape, generator=g).to(device)).cpu())
    z = torch.cat(samples).double()
    per_channel = z.transpose(0, 1).flatten(1)
    std = float(z.std())
    if not (std > 0 and math.isfinite(std)):
        raise LatentDiTError(f"measured latent std is {std}; training diverged")
    return {"latent_std": std, "latents_mean": [float(v) for v in per_channel.mean(1)],
            "latents_std": [float(v) for v in per_channel.std(1)], "stats_images": int(z.shape[0])}


def export(cfg: VAEConfig, model, splits: ImageSplits, vae_dir: Path, *, done: int, stopped_early: bool,
           elapsed: dict[str, float], contention_note: str, command: str, intended_use: str, history: str,
           log: Callable[[str], None]) -> dict[str, Any]:
    """Save the trained ``model`` to ``vae_dir`` with its model card; returns the card's facts."""
    model.eval()
    stats = latent_statistics(model, splits.train, cfg)
    model.register_to_config(scaling_factor=1.0 / stats["latent_std"], latents_mean=stats["latents_mean"],
                             latents_std=stats["latents_std"])
    model.save_pretrained(str(vae_dir), safe_serialization=True)
    vae = VAE.load(vae_dir)
    held_out = to_model_range(splits.val[:cfg.train.eval_images])
    reconstructions = vae.reconstruct(held_out)
    per_image = psnr(reconstructions, held_out)
    if not bool(torch.isfinite(per_image).all()):
        raise LatentDiTError("reconstruction PSNR is not finite; the VAE produced NaN/inf")
    delta_e = reconstruction_delta_e(held_out, reconstructions) if held_out.shape[1] == 3 else None
    n_check = min(cfg.train.eval_check_images, held_out.shape[0])
    weights = vae_dir / "diffusion_pytorch_model.safetensors"
    facts = {
        "name": cfg.name or "a latentdit VAE",
        "intended_use": intended_use,
        "psnr_db": round(float(per_image.mean()), 3), "psnr_images": int(held_out.shape[0]),
        "psnr_check_db": round(float(per_image[:n_check].mean()), 3), "psnr_check_images": n_check,
        "psnr_subset": "the first N held-out images",
        **({"delta_e2000": round(float(delta_e.mean()), 3)} if delta_e is not None else {}),
        "held_out_names": splits.val_names[:held_out.shape[0]],
        "scaling_factor": vae.scaling_factor, **stats,
        "steps_done": done, "stopped_early": stopped_early,
        **splits.facts,
        "train_wall_s": round(elapsed["train_wall_s"], 1), "train_cpu_s": round(elapsed["train_cpu_s"], 1),
        "cpu_threads": torch.get_num_threads(), "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores",
        "contention_note": contention_note, "command": command, "history": history,
        "parameters": sum(p.numel() for p in model.parameters()),
        "weights_file": weights.name, "weights_bytes": weights.stat().st_size, "weights_sha256": sha256_file(weights),
        "architecture": {k: (list(vae.config[k]) if k == "block_out_channels" else vae.config[k])
                         for k in ("block_out_channels", "layers_per_block", "latent_channels", "norm_num_groups",
                                   "mid_block_add_attention")},
        "config": cfg.to_dict(),
    }
    write_model_card(vae_dir, facts)
    log(f"saved {vae_dir}: scaling_factor {vae.scaling_factor:.6f}, PSNR {facts['psnr_db']:.2f} dB on "
        f"{facts['psnr_images']} held-out images ({facts['psnr_check_db']:.2f} dB on the first {n_check}"
        + (f"; mean ΔE2000 {facts['delta_e2000']:.2f}" if "delta_e2000" in facts else "") + "), "
        f"{weights.stat().st_size / 1e6:.2f} MB, {elapsed['train_wall_s'] / 60:.1f} min training")
    return facts

"""The model card of an exported VAE: ``MODEL_CARD.md`` (for people) and ``model_card.json`` (the
numbers it states, for tests and benchmarks)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from latentdit.data import is_fashion_mnist
from latentdit.io import atomic_write, write_json
from latentdit.vae.autoencoder import BUNDLED_VAE_CARD_JSON


def write_model_card(folder: Path, facts: dict[str, Any]) -> None:
    """``MODEL_CARD.md`` and ``model_card.json`` into the exported VAE's ``folder``."""
    write_json(folder / BUNDLED_VAE_CARD_JSON, facts)
    with atomic_write(folder / "MODEL_CARD.md", "w") as f:
        f.write(render_model_card(facts))


def render_model_card(facts: dict[str, Any]) -> str:
    c = facts["config"]
    d, m, lo, t = c["data"], c["model"], c["loss"], c["train"]
    arch = facts["architecture"]
    size, f = d["image_size"], 2 ** (len(arch["block_out_channels"]) - 1)
    # how much of the machine the run got: well below 100% means other work shared the cores
    cpu_share = facts["train_cpu_s"] / max(1e-9, facts["train_wall_s"] * facts["cpu_threads"])
    loss = f"{lo['recon'].upper()} reconstruction + {lo['kl_weight']:g} × KL (per pixel)"
    if lo["fft_weight"]:
        loss += f" + {lo['fft_weight']:g} × L1 between orthonormal 2-D spectra"
    if lo.get("lab_weight"):
        loss += f" + {lo['lab_weight']:g} × L1 between CIELAB values / 100"
    if lo["disc_weight"]:
        loss += (f"; from step {lo['disc_start']} a PatchGAN ({lo['disc_layers']} stride-2 layers, "
                 f"{lo['disc_channels']} channels) with hinge loss, generator term weighted "
                 f"{lo['disc_weight']:g} × ‖∇rec‖/(‖∇gan‖+1e-4) at the decoder's last layer (clamped to "
                 f"{lo['disc_max_weight']:g}), discriminator AdamW lr {t['disc_lr']:g}")
    lines = [
        f"# {facts['name']}",
        "",
        f"A small KL-regularised autoencoder (diffusers `AutoencoderKL`, KL-f{f}: {f}× spatial downsampling, "
        f"{arch['latent_channels']} latent channels) trained by latentdit's `tools/train_vae.py`, so that the "
        f"project works offline. It maps {size}×{size} RGB images in [-1, 1] to "
        f"{size // f}×{size // f}×{arch['latent_channels']} latents.",
        "",
    ]
    if facts.get("intended_use"):
        lines += ["## Intended use", facts["intended_use"], ""]
    reading = ("28×28 grey repeated to RGB, PIL bicubic resize" if is_fashion_mnist(facts["data_source"]) else
               "RGB, alpha composited on white, short side resized, centre crop")
    seen = "whole images" if d["crop_size"] in (0, size) else "crops"
    lines += [
        "## Data",
        f"- `{facts['data_source']}`: {facts['train_images']} training images, read by latentdit's extraction "
        f"loaders ({reading} to {size}×{size}); "
        + (seen if seen == "whole images" else f"random {d['crop_size']}-pixel crops")
        + " and horizontal flips during training."
        + (f" {facts['unreadable']} unreadable file(s) skipped." if facts.get("unreadable") else ""),
        f"- Held out (never trained on): {facts['val_images']} images, {facts['holdout']}.",
        "",
        "## Training",
        f"- Steps: {facts['steps_done']} of {t['steps']} planned"
        + (" (stopped early by --max-minutes)" if facts["stopped_early"] else "")
        + f", batch {t['batch_size']} ({facts['steps_done'] * t['batch_size']:,} {seen} seen)"
        + (f"; weights initialised from `{m['init_from']}`" if m["init_from"] else "") + ".",
        f"- Loss: {loss}.",
        f"- AdamW lr {t['lr']:g}, weight decay {t['weight_decay']:g}, {t['warmup_steps']} warmup steps, cosine "
        f"decay to {t['min_lr_ratio']:g}× lr, gradient clip {t['grad_clip']:g}, seed {t['seed']}.",
        f"- Wall time: {facts['train_wall_s'] / 60:.1f} min of training ({facts['train_cpu_s'] / 60:.1f} min of "
        f"process CPU time on {facts['cpu_threads']} thread(s): {cpu_share:.0%} of those threads' wall time), on "
        f"{facts['machine']}." + (f" {facts['contention_note']}" if facts.get("contention_note") else ""),
        f"- Command: `{facts['command']}`",
    ]
    if facts.get("history"):
        lines += [f"- {facts['history']}"]
    lines += [
        "",
        "## Architecture",
        f"- `AutoencoderKL`, block_out_channels {tuple(arch['block_out_channels'])}, layers_per_block "
        f"{arch['layers_per_block']}, norm_num_groups {arch['norm_num_groups']}, mid-block attention "
        f"{'on' if arch['mid_block_add_attention'] else 'off'}, latent_channels {arch['latent_channels']}.",
        f"- Parameters: {facts['parameters']:,}; weights file {facts['weights_file']} "
        f"({facts['weights_bytes'] / 1e6:.2f} MB, fp32 safetensors, sha256 {facts['weights_sha256'][:16]}…).",
        "",
        "## Latent statistics",
        f"- `scaling_factor = {facts['scaling_factor']:.6f}` = 1 / std of posterior samples of "
        f"{facts['stats_images']} training images (std {facts['latent_std']:.4f}).",
        f"- Per channel (config `latents_mean` / `latents_std`, used when latents are normalised per channel): "
        f"mean {[round(v, 4) for v in facts['latents_mean']]}, std {[round(v, 4) for v in facts['latents_std']]}.",
        "",
        "## Reconstruction quality",
        f"- PSNR (posterior mean, decoded, clamped to [-1, 1]; peak-to-peak 2; mean of per-image PSNR): "
        f"**{facts['psnr_db']:.2f} dB** on {facts['psnr_images']} held-out images; "
        f"{facts['psnr_check_db']:.2f} dB on the first {facts['psnr_check_images']} of them (the figure the test "
        "suite re-checks).",
    ]
    if "delta_e2000" in facts:
        lines.append(f"- Colour: mean CIEDE2000 ΔE **{facts['delta_e2000']:.2f}** on the same held-out images "
                     "(per image the mean over its pixels in 8-bit sRGB; about 1 is the smallest difference most "
                     "people notice side by side, 2–10 is visible at a glance).")
    if "tests_sample_psnr_db" in facts:
        lines.append(f"- {facts['tests_sample_psnr_db']:.2f} dB on the {facts['tests_sample_images']} held-out images "
                     f"shipped in `{facts['tests_sample_path']}` (the figure the test suite re-checks without the "
                     "collection installed).")
    for entry in facts.get("benchmarks", []):
        lines.append(f"- {entry['text']} (`{entry['command']}`)")
    lines += [
        "",
        "## Use",
        "```python",
        "from latentdit.vae import VAE",
        f"vae = VAE.load({facts['name']!r})",
        f"mean, std = vae.encode_moments(images)           # images: [N, 3, {size}, {size}] in [-1, 1]",
        "images = vae.decode(mean * vae.scaling_factor)   # decode takes scaled latents",
        "```",
        "",
    ]
    return "\n".join(lines)

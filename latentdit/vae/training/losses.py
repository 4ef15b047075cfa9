"""The losses of VAE training.

- reconstruction (L1 or L2, mean per pixel) + ``kl_weight`` × KL (summed per image, per pixel);
- optionally ``fft_weight`` × L1 between the orthonormal 2-D spectra of reconstruction and input;
- optionally ``lab_weight`` × L1 between their CIELAB values / 100: distances in CIELAB follow what the eye
  sees, where an L1 on sRGB counts a change of hue like any other change of the same size;
- from step ``loss.disc_start`` on, a PatchGAN discriminator with the hinge loss; its generator term is
  weighted adaptively, ``λ = disc_weight · clamp(‖∇_L rec‖ / (‖∇_L gan‖ + 1e-4), 0, disc_max_weight)``
  with ``L`` the decoder's last convolution (the weighting of the latent-diffusion autoencoders).
"""

from __future__ import annotations

import torch

from latentdit.colour import srgb_to_lab
from latentdit.vae.config import VAEConfig
from latentdit.vae.training.networks import PatchDiscriminator, last_layer

#: Added to the GAN gradient norm in the adaptive weight (as in the latent-diffusion autoencoders).
ADAPTIVE_EPS = 1e-4


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss: ``(mean relu(1 - D(x)) + mean relu(1 + D(x̂))) / 2``."""
    return 0.5 * (torch.relu(1.0 - logits_real).mean() + torch.relu(1.0 + logits_fake).mean())


def adaptive_gan_weight(rec_loss: torch.Tensor, gan_loss: torch.Tensor, layer: torch.Tensor,
                        max_weight: float) -> torch.Tensor:
    """``clamp(‖∇_layer rec_loss‖ / (‖∇_layer gan_loss‖ + 1e-4), 0, max_weight)``, detached."""
    rec_grad = torch.autograd.grad(rec_loss, layer, retain_graph=True)[0]
    gan_grad = torch.autograd.grad(gan_loss, layer, retain_graph=True)[0]
    return (rec_grad.norm() / (gan_grad.norm() + ADAPTIVE_EPS)).clamp(0.0, max_weight).detach()


def spectrum_l1(recon: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of the orthonormal 2-D FFTs (per channel) of ``recon`` and ``x``."""
    return (torch.fft.fft2(recon.float(), norm="ortho") - torch.fft.fft2(x.float(), norm="ortho")).abs().mean()


def lab_l1(recon: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of the CIELAB values of ``recon`` and ``x`` (sRGB in [-1, 1]), divided by 100."""
    return (srgb_to_lab(recon) - srgb_to_lab(x)).abs().mean() / 100


def gan_active(cfg: VAEConfig, step: int) -> bool:
    return cfg.loss.disc_weight > 0 and step >= cfg.loss.disc_start


def generator_loss(model, disc: PatchDiscriminator | None, x: torch.Tensor, eps: torch.Tensor, cfg: VAEConfig,
                   step: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """``(total VAE loss, reconstruction, logged parts)`` of one batch ``x`` with posterior noise ``eps``."""
    lo = cfg.loss
    posterior = model.encode(x).latent_dist
    recon = model.decode(posterior.mean + posterior.std * eps.to(memory_format=torch.channels_last)).sample
    err = recon - x
    rec = (err.abs() if lo.recon == "l1" else err.pow(2)).mean()
    kl = posterior.kl().mean()
    parts = {"rec": rec.detach(), "kl": kl.detach()}
    nll = rec + (lo.fft_weight * spectrum_l1(recon, x) if lo.fft_weight else 0.0)
    if lo.lab_weight:
        lab = lab_l1(recon, x)
        nll = nll + lo.lab_weight * lab
        parts["lab"] = lab.detach()
    loss = nll + lo.kl_weight * kl / x[0].numel()
    if disc is not None and gan_active(cfg, step):
        gan = -disc(recon).mean()
        weight = lo.disc_weight * adaptive_gan_weight(nll, gan, last_layer(model), lo.disc_max_weight)
        loss = loss + weight * gan
        parts.update(gan=gan.detach(), gan_w=weight.detach())
    return loss, recon, parts

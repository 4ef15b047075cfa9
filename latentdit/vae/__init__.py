"""The image autoencoder: loading (bundled name, local folder, hub id), encode/decode, reconstruction PSNR
(:mod:`latentdit.vae.autoencoder`), and its training on any image data (:mod:`latentdit.vae.training`,
configured by :mod:`latentdit.vae.config`)."""

from latentdit.vae.autoencoder import (
    BUNDLED_CLIPART_VAE, BUNDLED_RGB_VAE, BUNDLED_VAE, BUNDLED_VAE_CARD_JSON, BUNDLED_VAES, VAE, bundled_vae_path,
    default_vae_for, psnr, reconstruction_psnr, reconstruction_psnrs, resolve_vae_spec,
)

__all__ = ["BUNDLED_CLIPART_VAE", "BUNDLED_RGB_VAE", "BUNDLED_VAE", "BUNDLED_VAE_CARD_JSON", "BUNDLED_VAES", "VAE",
           "bundled_vae_path", "default_vae_for", "psnr", "reconstruction_psnr", "reconstruction_psnrs", "resolve_vae_spec"]

"""From sampled latents to pictures: decoding through the VAE, uint8 images, one PNG per sample."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from latentdit.errors import LatentDiTError
from latentdit.io import atomic_path
from latentdit.sampling.labels import label_text
from latentdit.visualize import to_uint8


def images_to_uint8(images: torch.Tensor) -> np.ndarray:
    """Images in [-1, 1] NCHW → uint8 NHWC numpy with 3 channels (grey is repeated)."""
    return to_uint8(images).permute(0, 2, 3, 1).contiguous().numpy()


@torch.no_grad()
def decode_images(vae, latents: torch.Tensor, batch_size: int = 32, norm=None) -> torch.Tensor:
    """Normalised latents → images in [-1, 1] (float32 NCHW, CPU) via ``vae.decode``, which undoes ``norm``
    (a :class:`latentdit.data.latent_norm.LatentNorm`, e.g. a checkpoint's ``latent_norm``; None: the VAE's
    scaling factor)."""
    if latents.shape[1] != vae.latent_channels:
        raise LatentDiTError(f"latents have {latents.shape[1]} channels but the VAE expects {vae.latent_channels}")
    if latents.shape[0] == 0:
        raise LatentDiTError("no latents to decode")
    return vae.decode_batched(latents, batch_size, norm=norm)


def decode_to_uint8(vae, latents: torch.Tensor, batch_size: int = 32, norm=None) -> np.ndarray:
    """Normalised latents → uint8 N×H×W×3 images (ADM layout); ``norm`` as in :func:`decode_images`."""
    return images_to_uint8(decode_images(vae, latents, batch_size, norm))


def save_individual_pngs(images: torch.Tensor, labels: Sequence[int], out_dir: str | Path,
                         class_names: Sequence[str] | None = None) -> list[Path]:
    """Write each image in [-1, 1] as ``OUT/000000-<label>.png`` (atomically); returns the paths."""
    from PIL import Image

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    arr = images_to_uint8(images)
    paths = []
    for i, (img, lab) in enumerate(zip(arr, labels)):
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", label_text(int(lab), class_names)).strip("_") or "label"
        path = out_dir / f"{i:06d}-{slug}.png"
        with atomic_path(path) as tmp:
            Image.fromarray(img).save(tmp, format="PNG")
        paths.append(path)
    return paths

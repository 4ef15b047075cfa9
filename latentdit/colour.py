"""Colour difference between images: mean CIEDE2000 ΔE per image (scikit-image's implementation).

ΔE is measured as a person sees the pictures: both images are quantised to 8-bit sRGB (as they would be
saved), converted to CIELAB (D65) and compared pixel by pixel; an image's value is the mean over its
pixels. A ΔE of about 1 is the smallest difference most people notice side by side, 2–10 is visible at a
glance, and white against black is 100.
"""

from __future__ import annotations

import numpy as np
import torch

from latentdit.errors import LatentDiTError


def to_srgb_uint8(images: torch.Tensor) -> np.ndarray:
    """``[N, 3, H, W]`` images in [-1, 1] → ``[N, H, W, 3]`` uint8, rounded as when saved to PNG."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise LatentDiTError(f"colour difference needs RGB images [N, 3, H, W]; got shape {tuple(images.shape)}")
    scaled = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round()
    return scaled.to(torch.uint8).permute(0, 2, 3, 1).numpy()


def delta_e_2000(reference: np.ndarray, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Mean CIEDE2000 ΔE of each image against its reference; both ``[N, H, W, 3]`` uint8 sRGB."""
    from skimage.color import deltaE_ciede2000, rgb2lab

    if reference.shape != images.shape or reference.ndim != 4 or reference.shape[-1] != 3:
        raise LatentDiTError(f"colour difference needs two [N, H, W, 3] batches of one shape; got "
                             f"{tuple(reference.shape)} and {tuple(images.shape)}")
    if reference.dtype != np.uint8 or images.dtype != np.uint8:
        raise LatentDiTError(f"colour difference needs uint8 sRGB images; got {reference.dtype} and {images.dtype}")
    out = np.empty(reference.shape[0], dtype=np.float64)
    for start in range(0, reference.shape[0], batch_size):
        stop = start + batch_size
        a = rgb2lab(reference[start:stop].astype(np.float64) / 255.0)
        b = rgb2lab(images[start:stop].astype(np.float64) / 255.0)
        out[start:stop] = deltaE_ciede2000(a, b).reshape(a.shape[0], -1).mean(axis=1)
    return out


def reconstruction_delta_e(originals: torch.Tensor, reconstructions: torch.Tensor) -> np.ndarray:
    """Per-image mean ΔE2000 of reconstructions against their originals, both ``[N, 3, H, W]`` in [-1, 1]."""
    return delta_e_2000(to_srgb_uint8(originals), to_srgb_uint8(reconstructions))

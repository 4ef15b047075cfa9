"""Image grids with text labels (training sample grids, sampling tools, the demo report), a line plot,
and the denoising trajectory picture (decoded x_t and x̂0 along a sampler's chain)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch

from latentdit.errors import LatentDiTError


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (N, C, H, W) → uint8 in [0, 255], 3 channels (grey is repeated)."""
    if images.ndim != 4:
        raise LatentDiTError(f"expected images shaped (N, C, H, W), got {tuple(images.shape)}")
    x = images.detach().float().cpu()
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def save_labeled_grid(images: torch.Tensor, labels_text: Sequence[str], path: str | os.PathLike,
                      nrow: int | None = None, padding: int = 2) -> Path:
    """Save images in [-1, 1] as a labelled PNG grid, atomically.

    ``nrow`` is the number of images per row (default: ``len(images) // len(labels_text)`` when the
    labels are one per row, else a near-square layout). ``labels_text`` holds either one label per
    row (drawn in a left margin: e.g. one row per class) or one label per image (drawn under each).
    """
    from PIL import Image, ImageDraw, ImageFont
    from torchvision.utils import make_grid

    from latentdit.io import atomic_path

    n = images.shape[0]
    if n == 0:
        raise LatentDiTError("save_labeled_grid: no images to save")
    labels = [str(s) for s in labels_text]
    if nrow is None:
        if labels and n % len(labels) == 0 and len(labels) < n:
            nrow = n // len(labels)
        elif len(labels) == n:
            nrow = max(1, int(round(n ** 0.5)))
        else:
            nrow = n
    rows = (n + nrow - 1) // nrow
    per_row = len(labels) == rows and not (len(labels) == n and nrow > 1)
    if labels and not per_row and len(labels) != n:
        raise LatentDiTError(f"save_labeled_grid: got {len(labels)} labels for {n} images in {rows} rows; "
                             "pass one label per row or one per image")
    grid = make_grid(to_uint8(images), nrow=nrow, padding=padding, pad_value=255)
    img = Image.fromarray(grid.permute(1, 2, 0).numpy())
    font = ImageFont.load_default()
    cell_h = images.shape[2] + padding
    cell_w = images.shape[3] + padding
    measure = ImageDraw.Draw(img)

    def text_size(s: str) -> tuple[int, int]:
        box = measure.textbbox((0, 0), s, font=font)
        return box[2] - box[0], box[3] - box[1]

    if per_row and labels:
        margin = max(text_size(s)[0] for s in labels) + 8
        canvas = Image.new("RGB", (img.width + margin, img.height), "white")
        canvas.paste(img, (margin, 0))
        draw = ImageDraw.Draw(canvas)
        for r, s in enumerate(labels):
            h = text_size(s)[1]
            draw.text((4, r * cell_h + padding + (cell_h - padding - h) // 2), s, fill="black", font=font)
    elif labels:
        line = max(text_size(s)[1] for s in labels) + 4
        canvas = Image.new("RGB", (img.width, img.height + rows * line), "white")
        draw = ImageDraw.Draw(canvas)
        for r in range(rows):
            strip = img.crop((0, r * cell_h, img.width, min(img.height, (r + 1) * cell_h + padding)))
            canvas.paste(strip, (0, r * (cell_h + line)))
            for c in range(nrow):
                i = r * nrow + c
                if i >= n:
                    break
                draw.text((c * cell_w + padding, r * (cell_h + line) + cell_h + 1), labels[i][: max(1, cell_w // 6)],
                          fill="black", font=font)
    else:
        canvas = img
    path = Path(path)
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")
    return path


def save_line_plot(xs: Sequence[float], ys: Sequence[float], path: str | os.PathLike, *, title: str = "",
                   xlabel: str = "", ylabel: str = "", size: tuple[int, int] = (640, 400)) -> Path:
    """Save a simple line plot (e.g. a loss curve) as PNG with PIL alone, atomically; the axes carry
    their min/max values."""
    from PIL import Image, ImageDraw, ImageFont

    from latentdit.io import atomic_path

    if len(xs) != len(ys) or len(xs) < 1:
        raise LatentDiTError(f"save_line_plot: need matching, non-empty x and y (got {len(xs)} and {len(ys)})")
    width, height = size
    left, right, top, bottom = 70, 20, 30, 45
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    x0, x1 = float(min(xs)), float(max(xs))
    y0, y1 = float(min(ys)), float(max(ys))
    if x1 == x0:
        x1 = x0 + 1
    if y1 == y0:
        y1 = y0 + 1

    def px(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x0) / (x1 - x0) * (width - left - right),
                height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom))

    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    draw.line([px(x, y) for x, y in zip(xs, ys)] if len(xs) > 1 else [px(xs[0], ys[0])] * 2,
              fill=(30, 90, 200), width=2)
    draw.text((left, 8), title, fill="black", font=font)
    draw.text((left, height - bottom + 6), f"{x0:g}", fill="black", font=font)
    draw.text((width - right - 40, height - bottom + 6), f"{x1:g}", fill="black", font=font)
    draw.text(((width - len(xlabel) * 6) // 2, height - 18), xlabel, fill="black", font=font)
    draw.text((6, top), f"{y1:.4g}", fill="black", font=font)
    draw.text((6, height - bottom - 10), f"{y0:.4g}", fill="black", font=font)
    draw.text((6, (height - bottom + top) // 2), ylabel, fill="black", font=font)
    path = Path(path)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return path


# ----------------------------------------------------------------------------------------------
# Denoising trajectory
# ----------------------------------------------------------------------------------------------

TRAJECTORY_HEADER = 14     # pixels above the grid for the time labels


def trajectory_steps(num_steps: int, num_points: int) -> list[int]:
    """Which of a sampler's ``num_steps`` steps to show: ``num_points`` (at most) evenly spread step
    indices, always the first and the last."""
    if num_points < 1:
        raise LatentDiTError(f"a trajectory needs at least one point, got {num_points}")
    if num_points == 1:
        return [num_steps - 1]
    return sorted({round(k * (num_steps - 1) / (num_points - 1)) for k in range(num_points)})


def record_trajectory(model: torch.nn.Module, labels: Sequence[int], settings=None, *, process=None, seed: int = 0,
                      indices: Sequence[int] | None = None, num_points: int = 8,
                      device: str | torch.device | None = None,
                      dtype: torch.dtype | None = None) -> tuple[list[dict], torch.Tensor]:
    """Sample ``labels`` in one batch and keep the sampler's state x_t and estimate x̂0 at
    :func:`trajectory_steps` of its steps. Sample j has the noise of global sample ``indices[j]``
    (default j) under ``seed``, so it is the same sample :func:`latentdit.sampling.sample_seeded` draws
    at that index.

    Returns (points, final latents): each point is the sampler callback's ``{"i", "t", "x", "denoised"}``
    (latents on the CPU), in chain order.
    """
    from latentdit.diffusion import DDPMProcess
    from latentdit.sampling import SamplerSettings, per_sample_noise, sample_latents

    process = process if process is not None else DDPMProcess()
    settings = (settings or SamplerSettings()).resolved(process, int(model.in_channels))
    keep = set(trajectory_steps(settings.num_steps, num_points))
    points: list[dict] = []

    def callback(info: dict) -> None:
        if info["i"] in keep:
            points.append({"i": info["i"], "t": info["t"], "x": info["x"].detach().float().cpu(),
                           "denoised": info["denoised"].detach().float().cpu()})

    indices = list(range(len(labels))) if indices is None else [int(i) for i in indices]
    if len(indices) != len(labels):
        raise LatentDiTError(f"record_trajectory: {len(indices)} sample indices for {len(labels)} labels")
    final = sample_latents(model, labels, settings, process=process, noise=per_sample_noise(seed, indices),
                           device=device, dtype=dtype, callback=callback)
    return points, final.cpu()


def _time_label(t: float | int) -> str:
    return f"t={t}" if isinstance(t, int) else f"t={t:.2f}"


def save_trajectory_grid(points: Sequence[dict], decode, row_names: Sequence[str], path: str | os.PathLike,
                         padding: int = 2) -> Path:
    """Write the trajectory picture (PNG, atomically): one column per point labelled with its time t,
    and for each sample two rows — the decoded state x_t, then the decoded estimate x̂0 — labelled
    ``<name>: x_t`` / ``<name>: x0 pred``. ``decode(latents) → images in [-1, 1]`` (e.g. a VAE's decode)."""
    from PIL import Image, ImageDraw, ImageFont
    from torchvision.utils import make_grid

    from latentdit.io import atomic_path

    if not points:
        raise LatentDiTError("save_trajectory_grid: no trajectory points")
    n = points[0]["x"].shape[0]
    if len(row_names) != n:
        raise LatentDiTError(f"save_trajectory_grid: {len(row_names)} names for {n} samples")
    # decode all states and estimates at once: [points, 2, n, C, H, W] → rows (sample, kind), columns (point)
    latents = torch.stack([torch.stack([p["x"], p["denoised"]]) for p in points])
    images = decode(latents.flatten(0, 2)).float().cpu()
    images = images.reshape(len(points), 2, n, *images.shape[1:]).permute(2, 1, 0, 3, 4, 5).flatten(0, 2)
    grid = make_grid(to_uint8(images), nrow=len(points), padding=padding, pad_value=255)
    img = Image.fromarray(grid.permute(1, 2, 0).numpy())
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(img)
    labels = [f"{name}: {kind}" for name in row_names for kind in ("x_t", "x0 pred")]  # ASCII: any PIL font
    margin = max(measure.textbbox((0, 0), s, font=font)[2] for s in labels) + 8
    canvas = Image.new("RGB", (img.width + margin, img.height + TRAJECTORY_HEADER), "white")
    canvas.paste(img, (margin, TRAJECTORY_HEADER))
    draw = ImageDraw.Draw(canvas)
    cell_h, cell_w = images.shape[2] + padding, images.shape[3] + padding
    for c, p in enumerate(points):
        draw.text((margin + padding + c * cell_w, 1), _time_label(p["t"]), fill="black", font=font)
    for r, s in enumerate(labels):
        draw.text((4, TRAJECTORY_HEADER + padding + r * cell_h + max(0, (cell_h - 12) // 2)), s, fill="black",
                  font=font)
    path = Path(path)
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")
    return path


def save_denoising_trajectory(model: torch.nn.Module, vae, labels: Sequence[int], path: str | os.PathLike,
                              settings=None, *, process=None, seed: int = 0, indices: Sequence[int] | None = None,
                              num_points: int = 8, class_names: Sequence[str] | None = None,
                              device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                              norm=None) -> Path:
    """Sample ``labels`` with the chosen sampler and write how each sample forms: decoded x_t and x̂0 at
    ~``num_points`` points along the chain (see :func:`record_trajectory`, :func:`save_trajectory_grid`);
    ``norm``: the latents' :class:`latentdit.data.latent_norm.LatentNorm` (None: the VAE's scaling factor)."""
    from latentdit.sampling import decode_images, label_text

    points, _ = record_trajectory(model, labels, settings, process=process, seed=seed, indices=indices,
                                  num_points=num_points, device=device, dtype=dtype)
    names = [label_text(int(lab), class_names) for lab in labels]
    dev = device if device is not None else next(model.parameters()).device
    return save_trajectory_grid(points, lambda z: decode_images(vae, z.to(dev), norm=norm), names, path)

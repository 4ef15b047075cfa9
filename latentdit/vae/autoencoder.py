"""The image autoencoder (a diffusers ``AutoencoderKL``): loading, posterior moments, decoding.

``VAE.load`` accepts a bundled name (:data:`BUNDLED_VAE`, a small KL-f8 VAE trained on Fashion-MNIST;
:data:`BUNDLED_RGB_VAE`, one trained on a mix of clip art, icons and photographs, the default for image
folders; :data:`BUNDLED_CLIPART_VAE`, its predecessor trained on clip art alone; all by
``tools/train_vae.py`` and shipped in ``latentdit/assets/``), a local folder written by ``save_pretrained``, or a hub id such as
``stabilityai/sd-vae-ft-ema``. All three go through ``AutoencoderKL.from_pretrained``.

The latent scaling factor is read from the VAE's own config (``VAE.scaling_factor``) and nowhere
else: ``encode_moments`` returns *unscaled* posterior moments, ``decode`` takes *scaled* latents.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from latentdit.data.latent_norm import LatentNorm
from latentdit.errors import LatentDiTError
from latentdit.io import sha256_file, sha256_json

#: The name users pass to get the VAE shipped with the package for Fashion-MNIST (the default data).
BUNDLED_VAE = "latentdit/kl-f8-fashion-mnist"
#: The bundled VAE for RGB image folders (trained on clip art, icons and photograph crops).
BUNDLED_RGB_VAE = "latentdit/kl-f8-rgb"
#: The earlier RGB VAE, trained on public-domain clip art alone.
BUNDLED_CLIPART_VAE = "latentdit/kl-f8-clipart"
#: Every bundled VAE: name -> folder under ``latentdit/assets/``.
BUNDLED_VAES = {BUNDLED_VAE: "vae-kl-f8-fashion-mnist", BUNDLED_RGB_VAE: "vae-kl-f8-rgb",
                BUNDLED_CLIPART_VAE: "vae-kl-f8-clipart"}
#: JSON file beside a bundled VAE holding the numbers its model card states.
BUNDLED_VAE_CARD_JSON = "model_card.json"

_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")

#: On a CPU, one encoder/decoder call covers at most this many image pixels (at least one image):
#: the convolutions run fastest while a call's activations stay in cache. Measured on a 2-core x86
#: CPU with the bundled VAE: 256² images encode at 15 img/s one per call vs 8.7 img/s 32 per call;
#: 64² images at 230 img/s 16 per call vs 164 img/s 32 per call alone, about even inside
#: tools/extract.py (where a DataLoader worker shares the cores and every extra call costs more).
CPU_PIXELS_PER_CALL = 65536


def bundled_vae_path(name: str = BUNDLED_VAE) -> Path:
    """The folder of the bundled VAE ``name`` inside the installed package."""
    return Path(str(resources.files("latentdit") / "assets" / BUNDLED_VAES[name]))


def default_vae_for(data: str | os.PathLike) -> str:
    """The bundled VAE for a ``--data`` value: Fashion-MNIST's own, else the general RGB one."""
    from latentdit.data import is_fashion_mnist

    return BUNDLED_VAE if is_fashion_mnist(data) else BUNDLED_RGB_VAE


def _looks_like_local_path(spec: str) -> bool:
    """Hub ids are ``owner/name``; anything else (absolute, relative, ``~``, deeper paths) is local."""
    return spec.startswith((".", "/", "~")) or "\\" in spec or spec.count("/") != 1


def resolve_vae_spec(spec: str | os.PathLike) -> tuple[str, Path | None]:
    """Return ``(spec as str, local folder or None for a hub id)``, checking local folders."""
    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
    if not isinstance(spec, str) or not spec:
        raise LatentDiTError(f"VAE spec must be a non-empty string or path, got {spec!r}")
    if spec in BUNDLED_VAES:
        folder = bundled_vae_path(spec)
        if not (folder / "config.json").is_file():
            raise LatentDiTError(f"the bundled VAE {spec!r} is missing from this installation "
                                 f"(expected {folder}/config.json); reinstall latentdit or rebuild it with "
                                 "tools/train_vae.py.")
        return spec, folder
    path = Path(spec).expanduser()
    if path.exists() or _looks_like_local_path(spec):
        if not path.is_dir():
            what = "is a file" if path.exists() else "does not exist"
            raise LatentDiTError(f"VAE folder {spec} {what}: expected a folder written by "
                                 f"AutoencoderKL.save_pretrained, a hub id like 'stabilityai/sd-vae-ft-ema', "
                                 f"or a bundled name ({', '.join(map(repr, BUNDLED_VAES))}).")
        if not (path / "config.json").is_file():
            raise LatentDiTError(f"VAE folder {spec} has no config.json: expected a folder written by "
                                 "AutoencoderKL.save_pretrained.")
        if not any((path / name).is_file() for name in _WEIGHT_FILES):
            raise LatentDiTError(f"VAE folder {spec} has no weights file (expected one of {', '.join(_WEIGHT_FILES)}).")
        return spec, path
    return spec, None


class VAE:
    """A loaded ``AutoencoderKL`` in eval mode with the helpers the latent pipeline needs."""

    def __init__(self, model: Any, spec: str = "<in memory>", folder: Path | None = None) -> None:
        # channels-last convolutions run about 2x faster on CPU (oneDNN) and use tensor cores on GPU
        self.model = model.eval().requires_grad_(False).to(memory_format=torch.channels_last)
        self.spec = spec
        self.folder = folder
        self._identity: dict[str, str] | None = None

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, spec: str | os.PathLike = BUNDLED_VAE, device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32) -> "VAE":
        """Load the bundled VAE, a local ``save_pretrained`` folder, or a hub id."""
        from diffusers import AutoencoderKL

        spec, folder = resolve_vae_spec(spec)
        try:
            model = AutoencoderKL.from_pretrained(str(folder) if folder is not None else spec, torch_dtype=dtype)
        except LatentDiTError:
            raise
        except Exception as e:
            if folder is not None:
                raise LatentDiTError(f"could not load the VAE in {folder}: {e}") from e
            raise LatentDiTError(
                f"could not load the VAE {spec!r} from the Hugging Face hub ({type(e).__name__}: {e}). "
                "If this machine is offline, download it elsewhere and pass the local folder written by "
                f"save_pretrained, or use a bundled VAE ({', '.join(map(repr, BUNDLED_VAES))})."
            ) from e
        return cls(model.to(device=device), spec=spec, folder=folder)

    # ------------------------------------------------------------------ facts
    @property
    def config(self) -> dict[str, Any]:
        return dict(self.model.config)

    @property
    def scaling_factor(self) -> float:
        """The latent scaling factor — read from the VAE config, the only place it is defined."""
        return float(self.model.config.scaling_factor)

    def latent_norm(self, kind: str = "scalar") -> LatentNorm:
        """The normalisation ``kind`` (see :data:`latentdit.data.latent_norm.LATENT_NORMS`) with this VAE's
        statistics."""
        if kind == "per-channel":
            mean, std = self.model.config.get("latents_mean"), self.model.config.get("latents_std")
            if mean is None or std is None:
                raise LatentDiTError(f"the VAE {self.spec} has no latents_mean / latents_std in its config; "
                                     "per-channel latent normalisation needs them (use the scalar one)")
            return LatentNorm(kind, self.scaling_factor, tuple(float(v) for v in mean), tuple(float(v) for v in std))
        return LatentNorm(kind, self.scaling_factor)

    @property
    def latent_channels(self) -> int:
        return int(self.model.config.latent_channels)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.model.config.block_out_channels) - 1)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def latent_shape(self, image_size: int) -> tuple[int, int, int]:
        """``(C, h, w)`` of the latents of a square ``image_size`` image."""
        if image_size % self.downsample_factor:
            raise LatentDiTError(f"image size {image_size} is not a multiple of the VAE's downsampling "
                                 f"factor {self.downsample_factor}.")
        side = image_size // self.downsample_factor
        return (self.latent_channels, side, side)

    def identity(self) -> dict[str, str]:
        """``dict(spec, config_sha256, weights_sha256)`` — what a latent manifest records."""
        if self._identity is None:
            config = {k: v for k, v in self.config.items() if not k.startswith("_")}
            self._identity = {"spec": self.spec, "config_sha256": sha256_json(config),
                              "weights_sha256": self._weights_sha256()}
        return dict(self._identity)

    def _weights_sha256(self) -> str:
        weights = self._weights_file()
        if weights is not None:
            return sha256_file(weights)
        import hashlib  # no file to hash (hub cache layout unknown): hash the tensors in name order

        h = hashlib.sha256()
        for name, tensor in sorted(self.model.state_dict().items()):
            h.update(name.encode())
            h.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return h.hexdigest()

    def _weights_file(self) -> Path | None:
        if self.folder is not None:
            candidates = [self.folder / name for name in _WEIGHT_FILES]
        else:
            try:
                from huggingface_hub import try_to_load_from_cache

                candidates = [Path(p) for p in (try_to_load_from_cache(self.spec, name) for name in _WEIGHT_FILES)
                              if isinstance(p, str)]
            except Exception:
                candidates = []
        return next((p for p in candidates if p.is_file()), None)

    # ------------------------------------------------------------------ encode / decode
    @torch.no_grad()
    def encode_moments(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior ``(mean, std)`` (unscaled, float32, on the VAE's device) of images in ``[-1, 1]``."""
        self._check_images(images)
        means, stds = [], []
        for chunk in self._calls(images, images.shape[-2] * images.shape[-1]):
            x = chunk.to(device=self.device, dtype=self.dtype).contiguous(memory_format=torch.channels_last)
            posterior = self.model.encode(x).latent_dist
            means.append(posterior.mean.float())
            stds.append(posterior.std.float())
        return torch.cat(means), torch.cat(stds)

    @torch.no_grad()
    def decode(self, scaled_latents: torch.Tensor, norm: LatentNorm | None = None) -> torch.Tensor:
        """Images in ``[-1, 1]`` (float32) from normalised latents: by default *multiplied by*
        ``scaling_factor``; with ``norm``, whatever :meth:`LatentNorm.normalize` made of them."""
        if scaled_latents.ndim != 4 or scaled_latents.shape[1] != self.latent_channels:
            raise LatentDiTError(f"latents must be shaped [N, {self.latent_channels}, h, w], "
                                 f"got {tuple(scaled_latents.shape)}")
        norm = self.latent_norm() if norm is None else norm
        pixels = scaled_latents.shape[-2] * scaled_latents.shape[-1] * self.downsample_factor ** 2
        images = []
        for chunk in self._calls(scaled_latents, pixels):
            z = norm.denormalize(chunk.to(device=self.device, dtype=self.dtype)).contiguous(
                memory_format=torch.channels_last)
            images.append(self.model.decode(z).sample.float().clamp(-1.0, 1.0))
        return torch.cat(images)

    def _calls(self, batch: torch.Tensor, pixels_per_image: int) -> tuple[torch.Tensor, ...]:
        """The batch as one model call (GPU), or split by :data:`CPU_PIXELS_PER_CALL` (CPU)."""
        if self.device.type != "cpu":
            return (batch,)
        return batch.split(max(1, CPU_PIXELS_PER_CALL // pixels_per_image))

    def encode_moments_batched(self, images: torch.Tensor, batch_size: int = 64,
                               progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`encode_moments` over ``images`` in chunks; results on the CPU."""
        means, stds = [], []
        for chunk in _chunks(images, batch_size, progress, "encode"):
            mean, std = self.encode_moments(chunk)
            means.append(mean.cpu())
            stds.append(std.cpu())
        return torch.cat(means), torch.cat(stds)

    def decode_batched(self, scaled_latents: torch.Tensor, batch_size: int = 64,
                       progress: bool = False, norm: LatentNorm | None = None) -> torch.Tensor:
        """:meth:`decode` over ``scaled_latents`` in chunks; results on the CPU."""
        return torch.cat([self.decode(chunk, norm).cpu()
                          for chunk in _chunks(scaled_latents, batch_size, progress, "decode")])

    def reconstruct(self, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """Decode of the posterior mean (the deterministic reconstruction), on the CPU."""
        mean, _ = self.encode_moments_batched(images, batch_size)
        norm = self.latent_norm()
        return self.decode_batched(norm.normalize(mean), batch_size, norm=norm)

    def _check_images(self, images: torch.Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != self.model.config.in_channels:
            raise LatentDiTError(f"images must be shaped [N, {self.model.config.in_channels}, H, W], "
                                 f"got {tuple(images.shape)}")
        f = self.downsample_factor
        if images.shape[2] % f or images.shape[3] % f:
            raise LatentDiTError(f"image size {tuple(images.shape[2:])} is not a multiple of the VAE's "
                                 f"downsampling factor {f}.")

    def __repr__(self) -> str:
        return (f"VAE(spec={self.spec!r}, latent_channels={self.latent_channels}, "
                f"downsample_factor={self.downsample_factor}, scaling_factor={self.scaling_factor:.6g})")


def _chunks(x: torch.Tensor, batch_size: int, progress: bool, desc: str):
    if batch_size < 1:
        raise LatentDiTError(f"batch_size must be ≥ 1, got {batch_size}")
    starts = range(0, x.shape[0], batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=desc, unit="batch")
    for start in starts:
        yield x[start:start + batch_size]


def psnr(images: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in ``[-1, 1]`` (peak-to-peak range 2) against references."""
    if images.shape != references.shape:
        raise LatentDiTError(f"PSNR needs equal shapes, got {tuple(images.shape)} and {tuple(references.shape)}")
    mse = (images.float() - references.float()).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(4.0 / mse.clamp_min(1e-12))


def reconstruction_psnrs(vae: VAE, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Per-image PSNR (dB) of ``vae``'s mean reconstruction of each image."""
    values = psnr(vae.reconstruct(images, batch_size), images.cpu())
    if not bool(torch.isfinite(values).all()):
        raise LatentDiTError("reconstruction PSNR is not finite; the VAE produced NaN/inf")
    return values


def reconstruction_psnr(vae: VAE, images: torch.Tensor, batch_size: int = 64) -> float:
    """Mean over images of the per-image PSNR (dB) of ``vae``'s mean reconstruction."""
    return float(reconstruction_psnrs(vae, images, batch_size).mean())

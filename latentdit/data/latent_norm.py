"""How latents are normalised for diffusion: :class:`LatentNorm`, the map between a VAE's raw latents
and the latents a DiT is trained on (recorded in the latent manifest and in the DiT's weights)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from latentdit.errors import LatentDiTError

#: How latents are normalised for diffusion: ``scalar`` multiplies by the config's ``scaling_factor``
#: (the Stable Diffusion convention, the default); ``per-channel`` maps each channel to zero mean and unit
#: std with the config's ``latents_mean`` / ``latents_std``.
LATENT_NORMS = ("scalar", "per-channel")


@dataclass(frozen=True)
class LatentNorm:
    """The map between a VAE's raw latents and the normalised latents diffusion works on (the one place
    it is defined: extraction records it in the manifest, training data applies it, decoding inverts it)."""

    kind: str = "scalar"
    scaling_factor: float = 1.0
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.kind not in LATENT_NORMS:
            raise LatentDiTError(f"latent normalisation must be one of {', '.join(LATENT_NORMS)}, got {self.kind!r}")
        if self.kind == "per-channel" and (self.mean is None or self.std is None or len(self.mean) != len(self.std)
                                           or not all(v > 0 for v in self.std)):
            raise LatentDiTError("per-channel latent normalisation needs latents_mean and latents_std of equal "
                                 f"length with positive stds, got {self.mean!r} / {self.std!r}")

    def _shape(self, z: torch.Tensor, values: tuple[float, ...]) -> torch.Tensor:
        if z.shape[-3] != len(values):
            raise LatentDiTError(f"latents have {z.shape[-3]} channels; the per-channel statistics have {len(values)}")
        return torch.tensor(values, dtype=z.dtype, device=z.device).view(-1, 1, 1)

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latents (``[..., C, h, w]``) → normalised latents."""
        if self.kind == "scalar":
            return z * self.scaling_factor
        return (z - self._shape(z, self.mean)) / self._shape(z, self.std)

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents → raw latents (the inverse of :meth:`normalize`)."""
        if self.kind == "scalar":
            return latents / self.scaling_factor
        return latents * self._shape(latents, self.std) + self._shape(latents, self.mean)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "scaling_factor": self.scaling_factor}
        if self.kind == "per-channel":
            out.update(mean=list(self.mean), std=list(self.std))
        return out

    @classmethod
    def from_dict(cls, data: Any, where: str = "latent_norm") -> "LatentNorm":
        if not isinstance(data, dict):
            raise LatentDiTError(f"{where}: expected a mapping with kind and scaling_factor, got {data!r}")
        try:
            mean, std = data.get("mean"), data.get("std")
            return cls(str(data["kind"]), float(data["scaling_factor"]),
                       None if mean is None else tuple(float(v) for v in mean),
                       None if std is None else tuple(float(v) for v in std))
        except (KeyError, TypeError, ValueError) as e:
            raise LatentDiTError(f"{where}: expected kind, scaling_factor (and mean/std), got {data!r}") from e

"""latentdit: latent diffusion transformers (DiT) — training, sampling and evaluation."""

from latentdit.errors import LatentDiTError

__version__ = "0.1.0"

__all__ = ["LatentDiTError", "__version__"]

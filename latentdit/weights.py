"""The DiT weights file and loading a model for sampling from any checkpoint form we accept.

Our weights are safetensors whose metadata describes the model (:func:`save_weights`,
:func:`weights_metadata`): the model config (``latentdit_model``), and when known the class names, the
VAE spec, the training items per class, the training process (``process``: DDPM or flow, see :mod:`latentdit.diffusion`), the DDPM
settings of older files (``latentdit_diffusion``) and the latents' normalisation.

:func:`load_model_for_sampling` reads such a file, a training checkpoint folder ``step-XXXXXXX`` or a
run folder (:func:`resolve_checkpoint_path`), or a released DiT ``.pt`` (raw state dict, or a dict
holding ``ema`` / ``model``), and returns the model with what the checkpoint says about it
(:class:`SamplingCheckpoint`); :func:`load_vae_for` gives the VAE that decodes its latents.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch

from latentdit.diffusion import META_PROCESS, DDPMProcess, Process, build_process, process_from_metadata
from latentdit.errors import LatentDiTError
from latentdit.io import read_safetensors_metadata, save_safetensors
from latentdit.models.checkpoint import (META_CLASS_COUNTS, META_CLASS_NAMES, META_DIFFUSION, META_LATENT_NORM,
                                         META_VAE)
from latentdit.models.checkpoint import METADATA_KEY as META_MODEL

if TYPE_CHECKING:  # the autoencoder module (diffusers) is imported only when a VAE is used
    from latentdit.data.latent_norm import LatentNorm

_PREFERRED_WEIGHTS = ("ema.safetensors", "model.safetensors")
_STEP_DIR = re.compile(r"^step-(\d+)$")


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------

def weights_metadata(model_config: Mapping[str, Any], class_names: list[str] | None,
                     vae: str | None = None, diffusion: Mapping[str, Any] | None = None,
                     process: Mapping[str, Any] | None = None,
                     latent_norm: Mapping[str, Any] | None = None,
                     class_counts: Sequence[int] | None = None) -> dict[str, str]:
    """The safetensors metadata of a weights file (JSON values under the keys the loaders read)."""
    meta = {META_MODEL: json.dumps(dict(model_config), sort_keys=True)}
    if process is not None:
        meta[META_PROCESS] = json.dumps(dict(process), sort_keys=True)
    if class_names is not None:
        meta[META_CLASS_NAMES] = json.dumps(list(class_names))
    if class_counts is not None:
        meta[META_CLASS_COUNTS] = json.dumps([int(c) for c in class_counts])
    if vae is not None:
        meta[META_VAE] = json.dumps(vae)
    if diffusion is not None:
        meta[META_DIFFUSION] = json.dumps(dict(diffusion), sort_keys=True)
    if latent_norm is not None:
        meta[META_LATENT_NORM] = json.dumps(dict(latent_norm), sort_keys=True)
    return meta


def save_weights(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike,
                 model_config: Mapping[str, Any], class_names: list[str] | None = None,
                 vae: str | None = None, diffusion: Mapping[str, Any] | None = None,
                 process: Mapping[str, Any] | None = None, latent_norm: Mapping[str, Any] | None = None,
                 class_counts: Sequence[int] | None = None) -> None:
    """Safetensors with the model config (and class names and the training items per class, VAE spec,
    noise schedule, the training process's ``metadata()``) in the metadata, so
    ``latentdit.models.checkpoint.load_dit`` and the sampling tools work from the file alone."""
    tensors = {k: v.detach().to("cpu") for k, v in state_dict.items()}
    save_safetensors(tensors, path, weights_metadata(model_config, class_names, vae, diffusion, process, latent_norm,
                                                     class_counts))


# ----------------------------------------------------------------------------------------------
# Loading for sampling
# ----------------------------------------------------------------------------------------------

@dataclass
class SamplingCheckpoint:
    """A model ready for sampling and what its checkpoint says about it."""

    model: torch.nn.Module
    path: Path                       # the weights file actually read
    model_name: str | None           # registry name (from --model or inferred), None if unknown
    class_names: list[str] | None    # None when the checkpoint carries no names (released DiT)
    vae_spec: str | None             # VAE named in the checkpoint metadata, if any
    process: Process = field(default_factory=DDPMProcess)   # the training process (ddpm for released DiT)
    metadata: dict[str, str] = field(default_factory=dict)
    latent_norm: LatentNorm | None = None   # of the training latents; None: the VAE's scaling_factor
    class_counts: list[int] | None = None   # training items per class; None when not recorded

    @property
    def num_classes(self) -> int:
        return int(self.model.num_classes)


def resolve_checkpoint_path(path: str | Path) -> Path:
    """The weights file behind ``path``.

    A file is returned as is. A folder holding ``ema.safetensors`` (preferred) or
    ``model.safetensors`` gives that file; a run folder holding ``step-XXXXXXX`` checkpoint folders
    (directly or under ``checkpoints/``) gives the newest step's weights.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise LatentDiTError(f"checkpoint not found: {path}")
    if path.is_file():
        return path
    for name in _PREFERRED_WEIGHTS:
        if (path / name).is_file():
            return path / name
    steps = []
    for parent in (path, path / "checkpoints"):
        if parent.is_dir():
            for child in parent.iterdir():
                m = _STEP_DIR.match(child.name)
                if m and child.is_dir():
                    steps.append((int(m.group(1)), child))
    for _, step_dir in sorted(steps, key=lambda s: s[0], reverse=True):
        for name in _PREFERRED_WEIGHTS:
            if (step_dir / name).is_file():
                return step_dir / name
    raise LatentDiTError(
        f"no weights found in folder {path}: expected ema.safetensors or model.safetensors, or "
        "step-XXXXXXX checkpoint folders holding them (pass a weights file directly otherwise)"
    )


def _json_meta(metadata: dict[str, str], key: str, path: Path) -> Any:
    if key not in metadata:
        return None
    try:
        return json.loads(metadata[key])
    except json.JSONDecodeError:
        if key == META_VAE:  # a plain spec string is fine too
            return metadata[key]
        raise LatentDiTError(f"checkpoint {path}: metadata field {key!r} is not valid JSON") from None


def _training_context(weights: Path) -> tuple[str | None, dict | None]:
    """VAE spec and diffusion settings of the training run, when ``weights`` sits in a training
    checkpoint folder (its ``state.json`` holds the resolved config; the latent manifest names the VAE)."""
    state_path = weights.parent / "state.json"
    if not state_path.is_file():
        return None, None
    try:
        config = json.loads(state_path.read_text()).get("config") or {}
        diffusion = config.get("diffusion")
        vae = None
        latents = (config.get("data") or {}).get("latents")
        if latents and (Path(latents) / "manifest.json").is_file():
            manifest = json.loads((Path(latents) / "manifest.json").read_text())
            vae = (manifest.get("vae") or {}).get("spec")
        return vae, diffusion if isinstance(diffusion, dict) else None
    except (OSError, ValueError, AttributeError):
        return None, None  # a damaged state.json only costs the defaults


def load_model_for_sampling(path: str | Path, model_name: str | None = None,
                            device: str | torch.device = "cpu", num_classes: int | None = None,
                            null_class: bool = True) -> SamplingCheckpoint:
    """Load a DiT for sampling from any checkpoint form we accept (see module docstring).

    The config comes from the safetensors metadata (``latentdit_model``) when present, else from
    ``model_name`` and the weights' shapes (see :func:`latentdit.models.checkpoint.load_dit`);
    ``num_classes`` / ``null_class=False`` say how to read a label table without a null row
    (:func:`latentdit.models.checkpoint.label_table_overrides`).
    """
    from latentdit.models.checkpoint import label_table_overrides, load_dit
    from latentdit.models.registry import find_model_name

    weights = resolve_checkpoint_path(path)
    metadata = read_safetensors_metadata(weights) if weights.suffix == ".safetensors" else {}
    model = load_dit(weights, model_name=model_name,  # explains a --model / file mismatch itself
                     **label_table_overrides(num_classes, null_class))
    name = model_name or find_model_name(model.config)
    model = model.to(device).eval()

    class_names = _json_meta(metadata, META_CLASS_NAMES, weights)
    if class_names is not None:
        if not isinstance(class_names, list) or len(class_names) != model.num_classes:
            raise LatentDiTError(
                f"checkpoint {weights}: metadata {META_CLASS_NAMES!r} should list {model.num_classes} "
                f"class names, found {len(class_names) if isinstance(class_names, list) else class_names!r}"
            )
        class_names = [str(c) for c in class_names]
    class_counts = _json_meta(metadata, META_CLASS_COUNTS, weights)
    if class_counts is not None:
        if (not isinstance(class_counts, list) or len(class_counts) != model.num_classes
                or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in class_counts)
                or sum(class_counts) == 0):
            raise LatentDiTError(f"checkpoint {weights}: metadata {META_CLASS_COUNTS!r} should list "
                                 f"{model.num_classes} non-negative counts with a positive sum, found {class_counts!r}")
    vae = _json_meta(metadata, META_VAE, weights)
    if isinstance(vae, dict):
        vae = vae.get("spec")
    diffusion = _json_meta(metadata, META_PROCESS, weights)
    if diffusion is None:
        diffusion = _json_meta(metadata, META_DIFFUSION, weights)  # older weights: ddpm settings only
    if vae is None or diffusion is None:
        run_vae, run_diffusion = _training_context(weights)
        vae = vae or run_vae
        diffusion = diffusion if diffusion is not None else run_diffusion
    try:
        process = process_from_metadata(diffusion) if META_PROCESS in metadata else build_process(diffusion or {})
        expected = process.out_channels(model.in_channels, bool(model.learn_sigma))
        if expected != model.out_channels:
            raise LatentDiTError(f"the model has {model.out_channels} output channels, but its {process.name} "
                                 f"process expects {expected}")
    except LatentDiTError as e:
        raise LatentDiTError(f"checkpoint {weights}: {e}") from None
    latent_norm = _json_meta(metadata, META_LATENT_NORM, weights)
    if latent_norm is not None:
        from latentdit.data.latent_norm import LatentNorm

        latent_norm = LatentNorm.from_dict(latent_norm, f"checkpoint {weights}: metadata {META_LATENT_NORM!r}")
    return SamplingCheckpoint(
        model=model, path=weights, model_name=name, class_names=class_names, class_counts=class_counts,
        vae_spec=str(vae) if vae else None, process=process,
        metadata=metadata, latent_norm=latent_norm,
    )


def load_vae_for(ckpt: SamplingCheckpoint, spec: str | None = None, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32):
    """The VAE to decode ``ckpt``'s latents: ``spec``, else the checkpoint's, else the bundled one.

    Checks that its latent channels match the model's input channels.
    """
    from latentdit.vae import BUNDLED_VAE, VAE

    vae = VAE.load(spec or ckpt.vae_spec or BUNDLED_VAE, device=device, dtype=dtype)
    if vae.latent_channels != ckpt.model.in_channels:
        raise LatentDiTError(
            f"VAE {vae.spec} has {vae.latent_channels} latent channels but the model expects "
            f"{ckpt.model.in_channels}; pass the VAE the model was trained with (--vae)"
        )
    return vae

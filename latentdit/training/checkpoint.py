"""DiT training checkpoints: what they hold beyond the shared scheme of :mod:`latentdit.engine.checkpoint`.

Layout of one checkpoint (``<run_dir>/checkpoints/step-0000100/``)::

    model.safetensors   live weights   (metadata: latentdit_model = JSON model config,
    ema.safetensors     EMA weights     latentdit_class_names = JSON list of class names)
    optimizer.pt        optimizer state_dict (torch.save; read back with weights_only=True)
    scheduler.pt        LR scheduler state_dict
    state.json          step, epoch, position in the epoch, resolved config, the latents' identity, versions
    rng-rank{r}.pt      RNG states of process r (torch, cuda, numpy, python)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

from latentdit.engine import checkpoint as engine_checkpoint
from latentdit.errors import LatentDiTError

MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"


# --------------------------------------------------------------------------------------------
# files inside a checkpoint
# --------------------------------------------------------------------------------------------

def read_state(ckpt: Path) -> dict[str, Any]:
    """``state.json`` of a DiT training checkpoint (it must record the step and the model config)."""
    return engine_checkpoint.read_state(ckpt, ("step", "model_config"))


#: What a run's latents must keep across a resume: the latent space (the VAE, its scaling and any per-channel
#: normalisation), the images it encoded (size, preprocessing), the latent shape and the meaning of the labels.
LATENT_IDENTITY_FIELDS = ("vae", "scaling_factor", "latent_norm", "image_size", "preprocessing", "latent_shape",
                          "class_names")


def latents_identity(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The parts of a latent manifest that a checkpoint records (``state.json``'s ``latents``) and a resume
    checks with :func:`check_resume_latents`."""
    ident = {name: manifest.get(name) for name in LATENT_IDENTITY_FIELDS}
    vae = manifest.get("vae") or {}
    ident["vae"] = {k: vae.get(k) for k in ("spec", "config_sha256", "weights_sha256")}
    return ident


def _vae_text(ident: Mapping[str, Any]) -> str:
    vae = ident.get("vae") or {}
    weights = str(vae.get("weights_sha256") or "?")[:12]
    return f"VAE {vae.get('spec')!r} (weights sha256 {weights}..., scaling factor {ident.get('scaling_factor')})"


def check_resume_latents(state: Mapping[str, Any], manifest: Mapping[str, Any], ckpt: str | os.PathLike,
                         latents: str | os.PathLike) -> None:
    """Refuse to resume checkpoint ``ckpt`` (its ``state``) on latents (``manifest`` of folder ``latents``)
    that were made differently from the ones it was trained on. Checkpoints that predate the record pass."""
    saved = state.get("latents")
    if not isinstance(saved, dict):
        return
    now = latents_identity(manifest)
    fix = ("point data.latents at latents extracted the same way, or start a new run with another "
           "train.run_dir")
    old_vae, new_vae = saved.get("vae") or {}, now["vae"]
    if (any(old_vae.get(k) != new_vae.get(k) for k in ("config_sha256", "weights_sha256"))
            or saved.get("scaling_factor") != now["scaling_factor"]):
        raise LatentDiTError(f"cannot resume from {ckpt}: it was trained on latents of {_vae_text(saved)}, but "
                             f"data.latents={latents} holds latents of {_vae_text(now)}; {fix}")
    for name in LATENT_IDENTITY_FIELDS:
        if name != "vae" and saved.get(name) != now[name]:
            raise LatentDiTError(f"cannot resume from {ckpt}: it was trained on latents with {name} "
                                 f"{_short(saved.get(name))}, but data.latents={latents} has {name} "
                                 f"{_short(now[name])}; {fix}")


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 120 else text[:117] + "..."

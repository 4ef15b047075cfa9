"""Training checkpoints: atomic directories, keep-last-K plus milestones, resume lookup, RNG states.

Layout of one checkpoint (``<run_dir>/checkpoints/step-0000100/``)::

    model.safetensors   live weights   (metadata: latentdit_model = JSON model config,
    ema.safetensors     EMA weights     latentdit_class_names = JSON list of class names)
    optimizer.pt        optimizer state_dict (torch.save; read back with weights_only=True)
    scheduler.pt        LR scheduler state_dict
    state.json          step, epoch, position in the epoch, resolved config, versions
    rng-rank{r}.pt      RNG states of process r (torch, cuda, numpy, python)

A checkpoint is written into ``.tmp-step-XXXXXXX`` and renamed when every file is complete, so a
directory named ``step-*`` is always whole; ``state.json`` is written last as a second guard.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from latentdit.errors import LatentDiTError
from latentdit.io import check_output_folder, read_json

CHECKPOINTS_DIRNAME = "checkpoints"
_STEP_RE = re.compile(r"^step-(\d{7,})$")
MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
STATE_FILE = "state.json"


def checkpoint_name(step: int) -> str:
    return f"step-{step:07d}"


def rng_file(rank: int) -> str:
    return f"rng-rank{rank}.pt"


@dataclass
class CheckpointInfo:
    step: int
    path: Path


class CheckpointManager:
    """Lists, creates (atomically) and prunes the checkpoints of one run directory.

    ``keep_last``: how many of the most recent checkpoints to keep; ``milestone_every``: steps that
    are multiples of it are kept forever (0 = no milestones).
    """

    def __init__(self, run_dir: str | os.PathLike, keep_last: int = 2, milestone_every: int = 0) -> None:
        self.run_dir = check_output_folder(run_dir, "run folder")
        self.dir = self.run_dir / CHECKPOINTS_DIRNAME
        self.keep_last = keep_last
        self.milestone_every = milestone_every

    def list(self) -> list[CheckpointInfo]:
        """Complete checkpoints, oldest first."""
        if not self.dir.is_dir():
            return []
        out = []
        for p in self.dir.iterdir():
            m = _STEP_RE.match(p.name)
            if m and p.is_dir() and (p / STATE_FILE).is_file():
                out.append(CheckpointInfo(int(m.group(1)), p))
        return sorted(out, key=lambda c: c.step)

    def latest(self) -> Path | None:
        items = self.list()
        return items[-1].path if items else None

    def tmp_path(self, step: int) -> Path:
        return self.dir / f".tmp-{checkpoint_name(step)}"

    def final_path(self, step: int) -> Path:
        return self.dir / checkpoint_name(step)

    def begin(self, step: int) -> Path:
        """(Main process.) Create an empty temporary directory for the checkpoint of ``step``."""
        tmp = self.tmp_path(step)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        return tmp

    def commit(self, step: int) -> Path:
        """(Main process.) Rename the finished temporary directory into place, then prune."""
        tmp, final = self.tmp_path(step), self.final_path(step)
        if not (tmp / STATE_FILE).is_file():
            raise LatentDiTError(f"checkpoint {tmp} is incomplete (no {STATE_FILE}); not committing it")
        _fsync_tree(tmp)
        if final.exists():  # the same step saved again (e.g. a resumed run that ends where it began)
            old = self.dir / f".old-{checkpoint_name(step)}"
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        _fsync_dir(self.dir)
        self.prune()
        return final

    def to_keep(self, steps: list[int]) -> set[int]:
        keep = set(sorted(steps)[-self.keep_last:]) if self.keep_last > 0 else set()
        if self.milestone_every > 0:
            keep |= {s for s in steps if s % self.milestone_every == 0}
        return keep

    def prune(self) -> list[Path]:
        """Delete checkpoints that are neither among the last ``keep_last`` nor milestones; also
        leftover temporary directories. Returns the deleted checkpoint paths."""
        items = self.list()
        keep = self.to_keep([c.step for c in items])
        removed = []
        for c in items:
            if c.step not in keep:
                shutil.rmtree(c.path, ignore_errors=True)
                removed.append(c.path)
        return removed

    def clean_temporaries(self) -> None:
        """Remove ``.tmp-*`` / ``.old-*`` directories left by a crash (main process, at start)."""
        if self.dir.is_dir():
            for p in self.dir.iterdir():
                if p.name.startswith((".tmp-", ".old-")) and p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for p in path.iterdir():
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(path)


def resolve_resume(spec: str | None, run_dir: str | os.PathLike) -> Path | None:
    """``None`` → None; ``"auto"`` → the latest complete checkpoint in ``run_dir`` (None if there is
    none); a path → that checkpoint dir, or the latest checkpoint of a run dir."""
    if spec is None or spec == "":
        return None
    if spec == "auto":
        return CheckpointManager(run_dir).latest()
    p = Path(spec).expanduser()
    if not p.exists():
        raise LatentDiTError(f"--resume {spec}: no such checkpoint or run directory")
    if not p.is_dir():
        raise LatentDiTError(f"--resume {spec}: expected a checkpoint folder (step-XXXXXXX) or a run folder, "
                             "got a file")
    if (p / STATE_FILE).is_file():
        return p
    run = p.parent if p.name == CHECKPOINTS_DIRNAME else p
    latest = CheckpointManager(run).latest()
    if latest is not None:
        return latest
    raise LatentDiTError(f"--resume {spec}: not a checkpoint (no {STATE_FILE}) and no complete "
                         f"checkpoint under {p / CHECKPOINTS_DIRNAME}")


# --------------------------------------------------------------------------------------------
# files inside a checkpoint
# --------------------------------------------------------------------------------------------

def read_state(ckpt: Path) -> dict[str, Any]:
    state = read_json(ckpt / STATE_FILE, "checkpoint state")
    missing = [k for k in ("step", "model_config") if not isinstance(state, dict) or k not in state]
    if missing:
        raise LatentDiTError(f"checkpoint state {ckpt / STATE_FILE} has no {' or '.join(map(repr, missing))}; "
                             "it is not a training checkpoint")
    return state


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


def rng_state() -> dict[str, Any]:
    """This process's RNG states in a form ``torch.load(weights_only=True)`` accepts."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    out: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": py_state[0], "state": list(py_state[1]), "gauss_next": py_state[2]},
    }
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore states written by :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    npst = state["numpy"]
    np.random.set_state((npst["name"], npst["keys"].numpy().astype(np.uint32), npst["pos"],
                         npst["has_gauss"], npst["cached_gaussian"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])

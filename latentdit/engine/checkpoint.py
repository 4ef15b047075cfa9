"""Checkpoints of a training run: atomic folders, keep-last-K plus milestones, resume lookup, the
commit protocol of several processes, and the config check of a resume.

A run folder holds ``checkpoints/step-XXXXXXX/`` folders. Each is written as ``.tmp-step-XXXXXXX`` and
renamed when every file is complete, so a folder named ``step-*`` is always whole; ``state.json`` is
written last as a second guard. What else a checkpoint holds is up to its trainer; every process adds
its RNG states as ``rng-rank{r}.pt``.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Collection, Mapping

from latentdit.engine.rng import rng_state, set_rng_state
from latentdit.errors import LatentDiTError
from latentdit.io import check_output_folder, fsync_dir, fsync_tree, read_json, torch_load, torch_save, write_json

CHECKPOINTS_DIRNAME = "checkpoints"
STATE_FILE = "state.json"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
_STEP_RE = re.compile(r"^step-(\d{7,})$")


def checkpoint_name(step: int) -> str:
    return f"step-{step:07d}"


def rng_file(rank: int) -> str:
    return f"rng-rank{rank}.pt"


@dataclass
class CheckpointInfo:
    step: int
    path: Path


class CheckpointManager:
    """Lists, creates (atomically) and prunes the checkpoints of one run folder.

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
        """(Main process.) Create an empty temporary folder for the checkpoint of ``step``."""
        tmp = self.tmp_path(step)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        return tmp

    def commit(self, step: int) -> Path:
        """(Main process.) Rename the finished temporary folder into place, then prune."""
        tmp, final = self.tmp_path(step), self.final_path(step)
        if not (tmp / STATE_FILE).is_file():
            raise LatentDiTError(f"checkpoint {tmp} is incomplete (no {STATE_FILE}); not committing it")
        fsync_tree(tmp)
        if final.exists():  # the same step saved again (e.g. a resumed run that ends where it began)
            old = self.dir / f".old-{checkpoint_name(step)}"
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        fsync_dir(self.dir)
        self.prune()
        return final

    def to_keep(self, steps: list[int]) -> set[int]:
        keep = set(sorted(steps)[-self.keep_last:]) if self.keep_last > 0 else set()
        if self.milestone_every > 0:
            keep |= {s for s in steps if s % self.milestone_every == 0}
        return keep

    def prune(self) -> list[Path]:
        """Delete checkpoints that are neither among the last ``keep_last`` nor milestones. Returns the
        deleted checkpoint paths."""
        items = self.list()
        keep = self.to_keep([c.step for c in items])
        removed = []
        for c in items:
            if c.step not in keep:
                shutil.rmtree(c.path, ignore_errors=True)
                removed.append(c.path)
        return removed

    def clean_temporaries(self) -> None:
        """Remove ``.tmp-*`` / ``.old-*`` folders left by a crash (main process, at start)."""
        if self.dir.is_dir():
            for p in self.dir.iterdir():
                if p.name.startswith((".tmp-", ".old-")) and p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)

    def save(self, accelerator, step: int, write_files: Callable[[Path], None], state: Mapping[str, Any]) -> Path:
        """Write the checkpoint of ``step`` (collective): every process its RNG states, the main process
        ``write_files(folder)`` and then ``state.json`` (``state``), and the main process commits it."""
        is_main = accelerator.is_main_process
        if is_main:
            self.begin(step)
        accelerator.wait_for_everyone()
        tmp = self.tmp_path(step)
        torch_save(rng_state(), tmp / rng_file(accelerator.process_index))
        if is_main:
            write_files(tmp)
        accelerator.wait_for_everyone()
        if is_main:
            write_json(tmp / STATE_FILE, dict(state))
            self.commit(step)
        accelerator.wait_for_everyone()
        return self.final_path(step)


def restore_rng_state(ckpt: Path, rank: int) -> bool:
    """Restore this process's RNG states from checkpoint ``ckpt`` if it holds them (True then)."""
    path = ckpt / rng_file(rank)
    if not path.is_file():
        return False
    set_rng_state(torch_load(path, "RNG state"))
    return True


def resolve_resume(spec: str | None, run_dir: str | os.PathLike) -> Path | None:
    """``None`` → None; ``"auto"`` → the latest complete checkpoint in ``run_dir`` (None if there is
    none); a path → that checkpoint folder, or the latest checkpoint of a run folder."""
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


def read_state(ckpt: Path, required: Collection[str], what: str = "training checkpoint") -> dict[str, Any]:
    """``state.json`` of checkpoint ``ckpt``; raises unless it is a mapping with the ``required`` keys."""
    state = read_json(ckpt / STATE_FILE, "checkpoint state")
    missing = [k for k in required if not isinstance(state, dict) or k not in state]
    if missing:
        raise LatentDiTError(f"checkpoint state {ckpt / STATE_FILE} has no {' or '.join(map(repr, missing))}; "
                             f"it is not a {what}")
    return state


def config_differences(saved: Mapping[str, Any], now: Mapping[str, Any],
                       resumable: Collection[tuple[str, str]]) -> list[str]:
    """``section.field`` names whose value in the config dict ``now`` differs from the one a run was
    started with (``saved``), leaving out the ``(section, field)`` pairs a resume may change."""
    out = []
    for section, fields in now.items():
        if not isinstance(fields, dict):
            continue
        old = saved.get(section)
        old = old if isinstance(old, dict) else {}
        for key, value in fields.items():
            if (section, key) not in resumable and old.get(key) != value:
                out.append(f"{section}.{key}")
    return out

"""The VAE training run (``tools/train_vae.py`` is its command line): checks, data, steps, checkpoints,
logs, export.

A run folder::

    OUT/vae_config.json       the resolved config (a resume must match it outside RESUMABLE_CHANGES)
    OUT/images.safetensors    the decoded images (uint8), reused by a resume
    OUT/metrics.jsonl         one JSON line per logged step (values averaged over the processes)
    OUT/tensorboard/          the same through accelerate's TensorBoard tracker
    OUT/samples/step-*.png    held-out images over their reconstructions
    OUT/checkpoints/step-*/   see :mod:`latentdit.vae.training.trainer`
    OUT/vae/                  the result: an AutoencoderKL folder with its model card

Every setting and path is checked before the images are decoded (the first expensive stage). Launched
with several processes (``python -m latentdit.launch --num_processes N tools/train_vae.py ...``) each
process trains on its share of every batch; the main process decodes the images, writes the logs,
checkpoints and the export.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any, Callable

import torch

from latentdit.engine.accelerator import make_accelerator
from latentdit.engine.budget import TimeBudget
from latentdit.engine.checkpoint import CheckpointManager, config_differences
from latentdit.engine.runlog import METRICS_FILE, RunLog, truncate_metrics
from latentdit.errors import LatentDiTError
from latentdit.io import atomic_path, read_json, write_json
from latentdit.vae.config import VAEConfig, vae_config_from_dict
from latentdit.vae.training.data import load_splits, plan_splits, process_rows, to_model_range
from latentdit.vae.training.export import export
from latentdit.vae.training.trainer import Trainer

CONFIG_FILE = "vae_config.json"
#: Fields that may differ between a run and its resumption (everything else must match).
RESUMABLE_CHANGES = {("train", "steps"), ("train", "sample_every"), ("train", "ckpt_every"), ("train", "keep_last"),
                     ("train", "stats_images"), ("train", "eval_images"), ("train", "eval_check_images"),
                     ("train", "log_every"), ("train", "tensorboard"), ("train", "max_minutes"),
                     ("data", "num_workers")}


def save_grid(path: Path, originals: torch.Tensor, reconstructions: torch.Tensor) -> None:
    """PNG with originals (top row) over reconstructions (bottom row)."""
    from PIL import Image
    from torchvision.utils import make_grid

    grid = make_grid(torch.cat([originals, reconstructions]), nrow=originals.shape[0], padding=2, pad_value=1.0,
                     normalize=True, value_range=(-1, 1))
    array = (grid.permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


def _reconstruction_grid(model, preview: torch.Tensor, path: Path) -> None:
    from latentdit.vae.autoencoder import VAE

    save_grid(path, preview, VAE(copy.deepcopy(model)).reconstruct(preview))  # VAE() freezes its model: a copy


def _check_resume(cfg: VAEConfig, out: Path, manager: CheckpointManager, resume: bool) -> Path | None:
    """The checkpoint to resume from (None for a fresh run); raises when the folder and flag disagree."""
    latest = manager.latest()
    if not resume:
        if latest is not None:
            raise LatentDiTError(f"{out} already holds a training run; pass --resume to continue it or choose "
                                 "another --out")
        return None
    if latest is None:
        raise LatentDiTError(f"--resume: no checkpoint in {manager.dir}")
    config_file = out / CONFIG_FILE
    saved = read_json(config_file, "VAE training config")
    vae_config_from_dict(saved, str(config_file))
    mismatched = config_differences(saved, cfg.to_dict(), RESUMABLE_CHANGES)
    if mismatched:
        raise LatentDiTError(f"--resume: config differs from the run in {out} in {mismatched}")
    return latest


def train_vae(cfg: VAEConfig, out: Path, *, resume: bool = False, contention_note: str = "", command: str = "",
              intended_use: str = "", history: str = "", log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train (or, with ``resume``, continue) into ``out``; export ``out/vae`` with its model card.
    Returns the model card's facts (on the main process; an empty dict on the others)."""
    out, t = Path(out), cfg.train
    manager = CheckpointManager(out, keep_last=t.keep_last)
    latest = _check_resume(cfg, out, manager, resume)
    accelerator = make_accelerator(out, tensorboard=t.tensorboard)
    main = accelerator.is_main_process
    process_rows(t.batch_size, accelerator.process_index, accelerator.num_processes)  # raises unless it splits
    if log is None:
        log = (lambda msg: print(msg, flush=True)) if main else (lambda msg: None)
    trainer = Trainer.create(cfg, accelerator)  # model.init_from and the discriminator's depth checked here
    plan = plan_splits(cfg)  # the data, the split sizes

    # ---- the run folder; the images (decoded by the main process, read from its cache by the others)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        manager.clean_temporaries()
        write_json(out / CONFIG_FILE, cfg.to_dict())
        splits = load_splits(cfg, out, plan)
    accelerator.wait_for_everyone()
    if not main:
        splits = load_splits(cfg, out, plan, progress=False)
    for line in splits.unreadable_report():
        log(line)

    step, elapsed = 0, {"train_wall_s": 0.0, "train_cpu_s": 0.0}
    if latest is not None:
        state = trainer.load(latest)
        step = int(state["step"])
        elapsed = {k: float(state.get(k, 0.0)) for k in elapsed}
        log(f"resumed from {latest}")
    if main:
        if latest is not None:
            truncate_metrics(out / METRICS_FILE, step)
        elif (out / METRICS_FILE).exists():
            (out / METRICS_FILE).unlink()
    n_params = sum(p.numel() for p in trainer.model.parameters())
    log(f"AutoencoderKL {n_params:,} parameters; {splits.train.shape[0]} training / {splits.val.shape[0]} held-out "
        f"images; steps {step}..{t.steps}; {accelerator.num_processes} process(es)")

    preview = to_model_range(splits.val[:8])
    # a resumed run continues its time budget (train.max_minutes counts the run's training time in all)
    run_log = RunLog(accelerator, out, start_step=step, max_steps=t.steps, max_minutes=t.max_minutes,
                     batch_size=t.batch_size, tensorboard=t.tensorboard, hparams=cfg.to_dict(), desc="train_vae",
                     spent_s=elapsed["train_wall_s"])
    budget = TimeBudget(t.max_minutes, accelerator, elapsed_s=elapsed["train_wall_s"])
    t0, c0 = time.time(), time.process_time()

    def times() -> dict[str, float]:
        return {"train_wall_s": elapsed["train_wall_s"] + time.time() - t0,
                "train_cpu_s": elapsed["train_cpu_s"] + time.process_time() - c0}

    stopped_early, done = False, step
    try:
        for step in range(step, t.steps):
            parts = trainer.step(splits.train, step)
            done = step + 1
            run_log.add(done, parts)
            log_now = done % t.log_every == 0 or done == t.steps
            if log_now:
                run_log.log(done, trainer.lr(step))
            if main and t.sample_every and (done % t.sample_every == 0 or done == t.steps):
                _reconstruction_grid(trainer.model, preview, out / "samples" / f"step-{done:07d}.png")
            out_of_time = done < t.steps and budget.spent(log_now or done % t.ckpt_every == 0)
            if done % t.ckpt_every == 0 or done == t.steps or out_of_time:
                trainer.save(manager, done, times())
            if out_of_time:
                stopped_early = True
                run_log.write(f"time budget train.max_minutes={t.max_minutes:g} reached at step {done}; "
                              "exporting this state")
                break
    finally:
        run_log.close()
    facts: dict[str, Any] = {}
    if main:
        facts = export(cfg, trainer.model, splits, out / "vae", done=done, stopped_early=stopped_early,
                       elapsed=times(), contention_note=contention_note, command=command, intended_use=intended_use,
                       history=history, log=log)
    accelerator.wait_for_everyone()
    return facts

"""What a training run is made of, built once: :class:`TrainState` and :func:`setup`, and its checkpoints.

:func:`setup` checks everything a user can get wrong before it writes anything, then builds the accelerator,
the latent dataset, the DiT, the training process (``diffusion.process``), the optimizer (``train.optimizer``)
with its LR schedule (``train.lr_schedule``), the time budget, the EMA and the data loader, and restores all
of them from a checkpoint when resuming (a time-bounded run continues its budget: the checkpoint holds the
training time used, ``elapsed_s``, which a time-based LR schedule also follows). :func:`save_checkpoint`
writes the run's state so that a resumed run repeats an uninterrupted one step for step (see
:mod:`latentdit.training.checkpoint` for the layout).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from latentdit.config import Config, model_arguments, save_config
from latentdit.engine.accelerator import enable_tf32, make_accelerator
from latentdit.engine.budget import TimeBudget
from latentdit.engine.checkpoint import (
    OPTIMIZER_FILE, SCHEDULER_FILE, CheckpointManager, resolve_resume, restore_rng_state,
)
from latentdit.engine.optim import build_adamw, build_muon
from latentdit.engine.runlog import METRICS_FILE, truncate_metrics
from latentdit.engine.schedule import lr_scheduler
from latentdit.errors import LatentDiTError
from latentdit.io import load_safetensors, torch_load, torch_save
from latentdit.seeding import seed_for
from latentdit.training import sharding
from latentdit.training.checkpoint import (
    EMA_FILE, MODEL_FILE, check_resume_latents, latents_identity, read_state,
)
from latentdit.training.data import BatchLayout, EpochIndexed, StepBatchSampler
from latentdit.training.ema import EMA, decay_rule
from latentdit.training.regularizers import build_regularizers
from latentdit.weights import save_weights

CONFIG_FILE = "config.yaml"


@dataclass
class TrainState:
    """One run: its settings, its parts, the step it has reached and its NaN record (the two fields the
    loop changes)."""

    cfg: Config
    accelerator: Any
    run_dir: Path
    dataset: Any
    layout: BatchLayout
    steps_per_epoch: int
    process: Any                     # latentdit.diffusion.Process: draw_time, training_losses, metadata
    model: torch.nn.Module           # as trained: prepared by accelerate (DDP), or sharded in place (FSDP2)
    raw_model: torch.nn.Module       # the DiT itself (EMA and checkpoints read it)
    forward_model: torch.nn.Module   # model, or torch.compile(model)
    model_config: dict[str, Any]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    budget: TimeBudget               # train.max_minutes, continued from the checkpoint when resuming
    ema: EMA
    loader: Any
    ckpts: CheckpointManager
    resumed_from: Path | None
    step: int
    first_bad_step: torch.Tensor     # -1, or the first step whose loss was not finite (kept on the device)
    regularizers: tuple = ()         # latentdit.training.regularizers: added to the diffusion loss

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def sharded(self) -> bool:
        return self.cfg.train.fsdp

    @property
    def label_dropout(self) -> bool:
        return self.cfg.model.class_dropout_prob > 0


# ------------------------------------------------------------------------------------------------
# building blocks
# ------------------------------------------------------------------------------------------------

def follows_budget(cfg: Config) -> bool:
    """Whether the LR schedule follows the time budget (a decaying schedule in a run bounded by
    ``train.max_minutes``) rather than the step count."""
    return cfg.train.max_minutes > 0 and cfg.train.lr_schedule != "constant"


def check_batch_layout(global_batch_size: int, num_processes: int, grad_accum: int) -> int:
    """Micro-batch size per process; raises unless the global batch splits evenly."""
    div = num_processes * grad_accum
    if global_batch_size % div != 0:
        raise LatentDiTError(
            f"train.global_batch_size={global_batch_size} is not divisible by num_processes ({num_processes}) × "
            f"train.grad_accum ({grad_accum}) = {div}; choose a multiple of {div}")
    return global_batch_size // div


def open_latents(cfg: Config):
    """The :class:`LatentDataset` named by ``data.latents`` (errors for a missing/empty directory)."""
    from latentdit.data.latents import LatentDataset

    if not cfg.data.latents:
        raise LatentDiTError("data.latents is not set: pass data.latents=<folder written by tools/extract.py>")
    root = Path(cfg.data.latents).expanduser()
    if not root.exists():
        raise LatentDiTError(f"data.latents: latent directory not found: {root} (run tools/extract.py first)")
    return LatentDataset(root, flip=cfg.data.flip, seed=cfg.train.seed)


def model_kwargs_from_data(cfg: Config, dataset) -> dict[str, Any]:
    """DiT constructor arguments: the model section (its named architecture resolved) plus latent
    size/channels/classes from the manifest, checked against any values the config states explicitly."""
    c, h, w = dataset.latent_shape
    if h != w:
        raise LatentDiTError(f"latents in {cfg.data.latents} are {h}×{w}; DiT needs square latents")
    from_data = {"input_size": h, "in_channels": c, "num_classes": dataset.num_classes}
    for key, value in from_data.items():
        stated = getattr(cfg.model, key)
        if stated is not None and stated != value:
            raise LatentDiTError(
                f"model.{key}={stated} does not fit the latents in {cfg.data.latents} (manifest: latent shape "
                f"{list(dataset.latent_shape)}, {dataset.num_classes} classes → {key}={value}); remove model.{key} "
                "or point data.latents at matching latents")
    return dict(model_arguments(cfg.model), **from_data)


def build_model(cfg: Config, dataset):
    from latentdit.models.dit import DiT

    return DiT(**model_kwargs_from_data(cfg, dataset))


def muon_matrices(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters ``optimizer: muon`` gives to Muon: the token-wise weight matrices of the DiT's blocks
    (attention and MLP). The adaLN modulation stays with AdamW: it maps one conditioning vector per image
    (its gradient's rank is at most the batch), and as the largest matrix of a block (6·width × width) it
    would take the largest share of the orthogonalisation's cost."""
    return [p for n, p in model.blocks.named_parameters() if p.ndim == 2 and "adaLN_modulation" not in n]


def build_optimizer(model: torch.nn.Module, t_cfg, device: torch.device) -> torch.optim.Optimizer:
    """The ``train`` section's optimizer: the shared AdamW (:func:`latentdit.engine.optim.build_adamw`), or
    with ``optimizer: muon`` Muon for :func:`muon_matrices` and AdamW for the rest."""
    if t_cfg.optimizer == "muon":
        return build_muon(model, muon_matrices(model), t_cfg.lr, weight_decay=t_cfg.weight_decay,
                          betas=t_cfg.betas, eps=t_cfg.adam_eps, momentum=t_cfg.muon_momentum)
    return build_adamw(model, t_cfg.lr, weight_decay=t_cfg.weight_decay, betas=t_cfg.betas, eps=t_cfg.adam_eps,
                       device=device)


def _config_diff(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Architecture differences between two model configs (the label-dropout rate may change on resume
    as long as the null class row exists in both or in neither; block options a config does not name
    are the paper's)."""
    from latentdit.models.dit import PAPER_BLOCKS

    a, b = {**PAPER_BLOCKS, **a}, {**PAPER_BLOCKS, **b}
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if k == "grad_checkpointing":
            continue
        if k == "class_dropout_prob" and va is not None and vb is not None:
            va, vb = float(va) > 0, float(vb) > 0
            if va != vb:
                out.append(f"null class row (class_dropout_prob > 0): checkpoint {va}, config {vb}")
            continue
        if va != vb:
            out.append(f"{k}: checkpoint {va!r}, config {vb!r}")
    return out


def checkpoint_process(state: dict[str, Any]) -> dict[str, Any]:
    """The process a checkpoint was trained with (checkpoints from before the flow process: their ddpm settings)."""
    from latentdit.diffusion import build_process

    if "process" in state:
        return state["process"]
    return build_process({**((state.get("config") or {}).get("diffusion") or {}), "process": "ddpm"}).metadata()


def _check_resumable(ckpt: Path, state: dict[str, Any], model_config: dict[str, Any], process, max_steps: int) -> None:
    diff = _config_diff(state["model_config"], model_config)
    if diff:
        raise LatentDiTError(f"cannot resume from {ckpt}: it holds a different model ({'; '.join(diff)}). "
                             "Use the same model.name and latents, or start a fresh run with another train.run_dir")
    old, new = checkpoint_process(state), process.metadata()
    if old != new:
        changed = [f"{k}: checkpoint {old.get(k)!r}, config {new.get(k)!r}"
                   for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        raise LatentDiTError(f"cannot resume from {ckpt}: it was trained with another diffusion process "
                             f"({'; '.join(changed)}). Use the run's diffusion settings, or start a fresh run "
                             "with another train.run_dir")
    if int(state["step"]) > max_steps:
        raise LatentDiTError(f"checkpoint {ckpt} is at step {state['step']}, past train.max_steps="
                             f"{max_steps}; raise train.max_steps to train further")


def _versions() -> dict[str, str]:
    import accelerate

    import latentdit

    return {"latentdit": latentdit.__version__, "torch": torch.__version__, "accelerate": accelerate.__version__}


def _make_accelerator(cfg: Config):
    t_cfg = cfg.train
    accelerator = make_accelerator(
        cfg.resolved_run_dir(), mixed_precision="no" if t_cfg.fsdp else t_cfg.mixed_precision,  # FSDP2: its policy
        tensorboard=t_cfg.tensorboard,
        hint="add train.fsdp=true to shard parameters, gradients and optimizer state across the processes "
             "(FSDP2, applied by this trainer)")
    if t_cfg.fsdp and accelerator.num_processes == 1:
        raise LatentDiTError("train.fsdp=true shards the model across processes, but this is a single process: "
                             "launch with `accelerate launch --multi_gpu --num_processes N` (N >= 2), or drop "
                             "train.fsdp")
    return accelerator


# ------------------------------------------------------------------------------------------------
# setup
# ------------------------------------------------------------------------------------------------

def setup(cfg: Config, resume: str | None = None) -> TrainState:
    """Build (or restore, ``resume="auto"`` or a path) the run described by ``cfg``. Raises
    :class:`LatentDiTError` for bad input before anything is written."""
    from latentdit.diffusion import build_process

    t_cfg = cfg.train
    decay_rule(t_cfg.ema_decay, t_cfg.ema_warmup, t_cfg.ema_sigma_rel)  # the EMA settings, before any work
    if t_cfg.tf32:
        enable_tf32()
    accelerator = _make_accelerator(cfg)
    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device

    # ---- checks: nothing is written before all of them pass
    layout = BatchLayout(t_cfg.global_batch_size, world, t_cfg.grad_accum, rank)
    check_batch_layout(t_cfg.global_batch_size, world, t_cfg.grad_accum)
    dataset = open_latents(cfg)
    steps_per_epoch = len(dataset) // t_cfg.global_batch_size
    if steps_per_epoch == 0:
        raise LatentDiTError(f"{cfg.data.latents} holds {len(dataset)} latents, fewer than "
                             f"train.global_batch_size={t_cfg.global_batch_size}")
    process = build_process(cfg.diffusion)
    torch.manual_seed(t_cfg.seed)  # same initial weights on every process
    model = build_model(cfg, dataset)
    model_config = model.config
    regularizers = tuple(build_regularizers(t_cfg, len(model.blocks), model.internal_block))
    run_dir = cfg.resolved_run_dir()
    ckpts = CheckpointManager(run_dir, t_cfg.keep_last, t_cfg.milestone_every)
    ckpt = resolve_resume(resume, run_dir)
    if ckpt is None and resume is None and ckpts.list():
        raise LatentDiTError(f"run directory {run_dir} already holds checkpoints (latest {ckpts.latest().name}); "
                             "pass --resume auto to continue it, or set train.run_dir to a new folder")
    saved: dict[str, Any] = {}
    if ckpt is not None:
        saved = read_state(ckpt)
        check_resume_latents(saved, dataset.manifest, ckpt, cfg.data.latents)
        _check_resumable(ckpt, saved, model_config, process, t_cfg.max_steps)

    # ---- the run directory
    start_step = int(saved.get("step", 0))
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        ckpts.clean_temporaries()
        save_config(cfg, run_dir / CONFIG_FILE)
        if ckpt is not None:
            truncate_metrics(run_dir / METRICS_FILE, start_step)
        elif (run_dir / METRICS_FILE).exists():
            (run_dir / METRICS_FILE).unlink()
    accelerator.wait_for_everyone()

    # ---- model, optimizer, EMA (restored when resuming), then data
    if ckpt is not None:
        tensors, _ = load_safetensors(ckpt / MODEL_FILE)
        model.load_state_dict(tensors, strict=True)
    model.to(device).train()
    if t_cfg.fsdp:
        sharding.shard_dit(model, torch.bfloat16 if t_cfg.mixed_precision == "bf16" else None)
    optimizer = build_optimizer(model, t_cfg, device)
    budget = TimeBudget(t_cfg.max_minutes, accelerator, elapsed_s=float(saved.get("elapsed_s", 0.0)))
    scheduler = lr_scheduler(optimizer, t_cfg.warmup_steps, t_cfg.max_steps, t_cfg.min_lr_ratio,
                             schedule=t_cfg.lr_schedule, decay_fraction=t_cfg.decay_fraction,
                             run_fraction=budget.fraction if follows_budget(cfg) else lambda: None)
    ema = EMA(model, t_cfg.ema_decay, warmup=t_cfg.ema_warmup, sigma_rel=t_cfg.ema_sigma_rel)
    if ckpt is not None:
        ema_tensors, _ = load_safetensors(ckpt / EMA_FILE)
        ema.load_state_dict(ema_tensors, str(ckpt / EMA_FILE))
        opt_state = torch_load(ckpt / OPTIMIZER_FILE, "optimizer state")
        if t_cfg.fsdp:
            sharding.load_optimizer_state(model, optimizer, opt_state, str(ckpt / OPTIMIZER_FILE))
        else:
            optimizer.load_state_dict(opt_state)
        scheduler.load_state_dict(torch_load(ckpt / SCHEDULER_FILE, "LR scheduler state"))
        restore_rng_state(ckpt, rank)
    else:
        torch.manual_seed(seed_for("latentdit-process", t_cfg.seed, rank))
    raw_model = model
    if not t_cfg.fsdp:
        model, optimizer = accelerator.prepare(model, optimizer)
    loader = torch.utils.data.DataLoader(
        EpochIndexed(dataset),
        batch_sampler=StepBatchSampler(len(dataset), layout, t_cfg.seed, start_step, t_cfg.max_steps),
        num_workers=cfg.data.num_workers, pin_memory=device.type == "cuda", persistent_workers=False)
    return TrainState(
        cfg=cfg, accelerator=accelerator, run_dir=run_dir, dataset=dataset, layout=layout,
        steps_per_epoch=steps_per_epoch, process=process, model=model, raw_model=raw_model,
        forward_model=torch.compile(model) if t_cfg.compile else model, model_config=model_config,
        optimizer=optimizer, scheduler=scheduler, budget=budget, ema=ema, loader=loader, ckpts=ckpts,
        resumed_from=ckpt, step=start_step, first_bad_step=torch.full((), -1, dtype=torch.long, device=device),
        regularizers=regularizers)


# ------------------------------------------------------------------------------------------------
# NaN guard and checkpoints
# ------------------------------------------------------------------------------------------------

def note_loss(state: TrainState, step_loss: torch.Tensor) -> None:
    """Remember the first step whose loss is not finite (on the device: no host sync)."""
    bad = state.first_bad_step
    state.first_bad_step = torch.where((bad < 0) & ~torch.isfinite(step_loss), torch.full_like(bad, state.step), bad)


def check_finite(state: TrainState) -> None:
    """Raise if any process saw a non-finite loss (collective when there are several processes)."""
    bad = state.first_bad_step
    if state.world > 1:
        bad = state.accelerator.gather(bad.reshape(1)).max()
    bad_step = int(bad.item())
    if bad_step >= 0:
        last = state.ckpts.latest()
        where = f"the last good checkpoint is {last}" if last else "no checkpoint was written"
        raise LatentDiTError(
            f"training stopped: the loss became NaN or inf at step {bad_step}; {where} (not overwritten). "
            "Lower train.lr, enable train.grad_clip, or use mixed_precision=no/bf16")


def save_checkpoint(state: TrainState) -> Path:
    """Write the checkpoint of ``state.step`` (collective); refuses to save after a non-finite loss."""
    check_finite(state)
    acc, step, is_main = state.accelerator, state.step, state.is_main
    if state.sharded:  # gathered by every process
        model_sd = sharding.full_model_state(state.model, keep=is_main)
        opt_sd = sharding.full_optimizer_state(state.model, state.optimizer, keep=is_main)
    else:
        model_sd, opt_sd = acc.get_state_dict(state.model), state.optimizer.state_dict()
    ema_sd = state.ema.state_dict(state.raw_model)
    ds, process, t_cfg = state.dataset, state.process, state.cfg.train

    def write_files(tmp: Path) -> None:
        meta = dict(class_names=ds.class_names, class_counts=ds.class_counts, vae=ds.vae,
                    process=process.metadata(), latent_norm=ds.latent_norm.to_dict(),
                    diffusion=process.legacy_metadata())
        save_weights(model_sd, tmp / MODEL_FILE, state.model_config, **meta)
        save_weights(ema_sd, tmp / EMA_FILE, state.model_config, **meta)
        torch_save(opt_sd, tmp / OPTIMIZER_FILE)
        torch_save(state.scheduler.state_dict(), tmp / SCHEDULER_FILE)

    epoch, pos = divmod(step, state.steps_per_epoch)
    record = {
        "step": step, "epoch": epoch, "position": pos, "steps_per_epoch": state.steps_per_epoch,
        "global_batch_size": t_cfg.global_batch_size, "num_processes": state.world, "seed": t_cfg.seed,
        "model_config": state.model_config, "process": process.metadata(), "class_names": ds.class_names,
        "config": state.cfg.to_dict(), "latents": latents_identity(ds.manifest), "versions": _versions(),
        "time": time.time(), "elapsed_s": state.budget.agreed_elapsed_s}
    return state.ckpts.save(acc, step, write_files, record)

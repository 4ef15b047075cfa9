"""The DiT training loop: accelerate (DDP, mixed precision) or FSDP2 sharding, AdamW, EMA, checkpoints, logging.

One call to :func:`train` runs (or resumes) a run directory::

    <run_dir>/config.yaml          resolved config
    <run_dir>/metrics.jsonl        one JSON line per logged step (loss averaged over all processes)
    <run_dir>/tensorboard/         the same scalars through accelerate's TensorBoard tracker
    <run_dir>/samples/step-*.png   EMA sample grids with guidance, decoded through the run's VAE
    <run_dir>/checkpoints/step-*/  see :mod:`latentdit.training.checkpoint`

Data order and per-step randomness follow :mod:`latentdit.training.data`, so the losses do not
depend on the number of processes and a resumed run repeats an uninterrupted one step for step.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from latentdit.config import Config, save_config
from latentdit.errors import LatentDiTError
from latentdit.io import load_safetensors, torch_load, torch_save, write_json
from latentdit.training.checkpoint import (
    EMA_FILE, MODEL_FILE, OPTIMIZER_FILE, SCHEDULER_FILE, STATE_FILE, CheckpointManager,
    read_state, resolve_resume, rng_file, rng_state, save_weights, set_rng_state,
)
from latentdit.training.data import BatchLayout, EpochIndexed, StepBatchSampler, StepRandomness, seed_for
from latentdit.training.ema import EMA, warmup_decay
from latentdit.training import sharding

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.yaml"

LossHook = Callable[[int, torch.Tensor], torch.Tensor]


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    last_checkpoint: Path | None
    stop_reason: str


def enable_tf32() -> None:
    """TF32 matmuls/convolutions on Ampere+ GPUs (call from an entry point, never at import)."""
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


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
    """DiT constructor arguments: the model section plus latent size/channels/classes from the manifest,
    checked against any values the config states explicitly."""
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
    return dict(from_data, class_dropout_prob=cfg.model.class_dropout_prob, learn_sigma=cfg.model.learn_sigma,
                grad_checkpointing=cfg.model.grad_checkpointing)


def build_model(cfg: Config, dataset):
    from latentdit.models import create_dit

    kwargs = model_kwargs_from_data(cfg, dataset)
    from latentdit.models.registry import get_config

    patch = get_config(cfg.model.name)["patch_size"]
    if kwargs["input_size"] % patch != 0:
        raise LatentDiTError(f"model.name={cfg.model.name} has patch size {patch}, which does not divide the "
                             f"latent size {kwargs['input_size']} of {cfg.data.latents}")
    return create_dit(cfg.model.name, **kwargs)


def build_optimizer(model: torch.nn.Module, t_cfg, device: torch.device) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; the fused kernel on CPU and CUDA (one pass over all
    parameters instead of a Python loop per tensor)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(trainable, lr=t_cfg.lr, betas=tuple(t_cfg.betas), eps=t_cfg.adam_eps,
                             weight_decay=t_cfg.weight_decay, fused=device.type in ("cpu", "cuda"))


def diffusion_loss(diffusion, forward_model: torch.nn.Module, x0: torch.Tensor, y: torch.Tensor,
                   rand: StepRandomness, label_dropout: bool) -> torch.Tensor:
    """Mean training loss of one micro-batch with the given timesteps, noise and label-drop mask."""
    device = x0.device
    kwargs: dict[str, Any] = {"y": y}
    if label_dropout:
        kwargs["force_drop_ids"] = rand.drop.to(device, non_blocking=True)
    losses = diffusion.training_losses(forward_model, x0, rand.t.to(device, non_blocking=True),
                                       noise=rand.noise.to(device, non_blocking=True), model_kwargs=kwargs)
    return losses["loss"].mean()


def _config_diff(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Architecture differences between two model configs (the label-dropout rate may change on resume
    as long as the null class row exists in both or in neither)."""
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


def _flat_hparams(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat_hparams(v, key + "."))
        elif isinstance(v, (bool, int, float, str)):
            out[key] = v
        else:
            out[key] = str(v)
    return out


def _versions() -> dict[str, str]:
    import accelerate

    import latentdit

    return {"latentdit": latentdit.__version__, "torch": torch.__version__, "accelerate": accelerate.__version__}


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep only metric rows of steps ≤ ``step`` (rows a killed run logged after its last checkpoint)."""
    if not path.is_file():
        return
    from latentdit.io import atomic_write

    keep = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
        if row.get("step", 0) <= step:
            keep.append(line)
    with atomic_write(path, "w") as f:
        f.write("".join(line + "\n" for line in keep))


class _SampleGrid:
    """Periodic EMA sample grid with guidance (main process only)."""

    def __init__(self, cfg: Config, dataset, model_config: dict[str, Any], device: torch.device) -> None:
        self.cfg, self.dataset, self.model_config, self.device = cfg, dataset, model_config, device
        self.model = None
        self.vae = None

    def __call__(self, ema_state: dict[str, torch.Tensor], step: int, path: Path) -> Path:
        from latentdit.autoencoder import VAE
        from latentdit.models import DiT
        from latentdit.sampling import sample_latents
        from latentdit.visualize import save_labeled_grid

        cfg, ds = self.cfg, self.dataset
        if self.model is None:
            self.model = DiT(**dict(self.model_config, grad_checkpointing=False)).to(self.device).eval()
        if self.vae is None:
            self.vae = VAE.load(ds.vae, device=self.device)
        self.model.load_state_dict(ema_state)
        k = min(cfg.train.sample_num_classes, ds.num_classes)
        classes = sorted({round(i * (ds.num_classes - 1) / max(1, k - 1)) for i in range(k)})
        seeds = cfg.train.sample_num_seeds
        y = torch.tensor(classes, device=self.device).repeat_interleave(seeds)
        scale = cfg.train.sample_cfg_scale if cfg.model.class_dropout_prob > 0 else 1.0
        gen = torch.Generator(device=self.device).manual_seed(seed_for("latentdit-sample-grid", cfg.train.seed))
        with torch.no_grad():
            latents = sample_latents(self.model, y, cfg_scale=scale, sampler="ddpm",
                                     num_steps=cfg.diffusion.sample_steps, generator=gen,
                                     noise_schedule=cfg.diffusion.noise_schedule,
                                     diffusion_steps=cfg.diffusion.diffusion_steps)
            images = self.vae.decode(latents)
        names = [ds.class_names[c] if c < len(ds.class_names) else str(c) for c in classes]
        labels = [f"{n} (cfg {scale:g})" if i == 0 else n for i, n in enumerate(names)]
        return save_labeled_grid(images, labels, path, nrow=seeds)


def train(cfg: Config, resume: str | None = None, *, loss_hook: LossHook | None = None) -> TrainResult:
    """Train (or resume, ``resume="auto"`` or a path) the run described by ``cfg``.

    ``loss_hook(step, loss) -> loss`` is a test seam called on every micro-batch loss (e.g. to inject
    a NaN). Raises :class:`LatentDiTError` for bad input, before anything is written.
    """
    from accelerate import Accelerator
    from accelerate.utils import broadcast

    from latentdit.diffusion import create_diffusion

    t_cfg = cfg.train
    if t_cfg.tf32:
        enable_tf32()
    # Several processes without CUDA (e.g. `accelerate launch --multi_gpu --num_processes 2` on a CPU
    # machine): accelerate sets up gloo (MULTI_CPU) only when asked for the CPU explicitly.
    multi_cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    sharded = t_cfg.fsdp  # FSDP2 applied here (mixed precision through its policy), not by accelerate
    accelerator = Accelerator(
        cpu=multi_cpu,
        mixed_precision="no" if sharded else t_cfg.mixed_precision,
        log_with="tensorboard" if t_cfg.tensorboard else None,
        project_dir=str(cfg.resolved_run_dir()),
        step_scheduler_with_optimizer=False,
    )
    world, rank, is_main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    device = accelerator.device
    from accelerate.utils import DistributedType

    if accelerator.distributed_type not in (DistributedType.NO, DistributedType.MULTI_CPU,
                                            DistributedType.MULTI_GPU):
        raise LatentDiTError(
            f"accelerate distributed type {accelerator.distributed_type.value} is not supported: launch with "
            "`accelerate launch --multi_gpu` (DDP), and add train.fsdp=true to shard parameters, gradients and "
            "optimizer state across the processes (FSDP2, applied by this trainer)")

    # ---- checks: nothing is written before all of them pass -------------------------------------
    if sharded and world == 1:
        raise LatentDiTError("train.fsdp=true shards the model across processes, but this is a single process: "
                             "launch with `accelerate launch --multi_gpu --num_processes N` (N >= 2), or drop "
                             "train.fsdp")
    layout = BatchLayout(t_cfg.global_batch_size, world, t_cfg.grad_accum, rank)
    check_batch_layout(t_cfg.global_batch_size, world, t_cfg.grad_accum)
    dataset = open_latents(cfg)
    steps_per_epoch = len(dataset) // t_cfg.global_batch_size
    if steps_per_epoch == 0:
        raise LatentDiTError(f"{cfg.data.latents} holds {len(dataset)} latents, fewer than "
                             f"train.global_batch_size={t_cfg.global_batch_size}")
    torch.manual_seed(t_cfg.seed)  # same initial weights on every process
    model = build_model(cfg, dataset)
    model_config = model.config
    diffusion = create_diffusion("", cfg.diffusion.noise_schedule, cfg.diffusion.diffusion_steps,
                                 cfg.model.learn_sigma)
    run_dir = cfg.resolved_run_dir()
    ckpts = CheckpointManager(run_dir, t_cfg.keep_last, t_cfg.milestone_every)
    ckpt = resolve_resume(resume, run_dir)
    if ckpt is None and resume is None and ckpts.list():
        raise LatentDiTError(f"run directory {run_dir} already holds checkpoints (latest {ckpts.latest().name}); "
                             "pass --resume auto to continue it, or set train.run_dir to a new folder")
    state: dict[str, Any] = {}
    if ckpt is not None:
        state = read_state(ckpt)
        diff = _config_diff(state["model_config"], model_config)
        if diff:
            raise LatentDiTError(f"cannot resume from {ckpt}: it holds a different model ({'; '.join(diff)}). "
                                 "Use the same model.name and latents, or start a fresh run with another train.run_dir")
        if int(state["step"]) > t_cfg.max_steps:
            raise LatentDiTError(f"checkpoint {ckpt} is at step {state['step']}, past train.max_steps="
                                 f"{t_cfg.max_steps}; raise train.max_steps to train further")

    # ---- set up ---------------------------------------------------------------------------------
    start_step = int(state.get("step", 0))
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        ckpts.clean_temporaries()
        save_config(cfg, run_dir / CONFIG_FILE)
        if ckpt is not None:
            _truncate_metrics(run_dir / METRICS_FILE, start_step)
        elif (run_dir / METRICS_FILE).exists():
            (run_dir / METRICS_FILE).unlink()
    accelerator.wait_for_everyone()

    if ckpt is not None:
        tensors, _ = load_safetensors(ckpt / MODEL_FILE)
        model.load_state_dict(tensors, strict=True)
    model.to(device).train()
    if sharded:
        sharding.shard_dit(model, torch.bfloat16 if t_cfg.mixed_precision == "bf16" else None)
    optimizer = build_optimizer(model, t_cfg, device)
    warmup = t_cfg.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup > 0 else 1.0)
    ema = EMA(model, t_cfg.ema_decay)
    if ckpt is not None:
        ema_tensors, _ = load_safetensors(ckpt / EMA_FILE)
        ema.load_state_dict(ema_tensors, str(ckpt / EMA_FILE))
        opt_state = torch_load(ckpt / OPTIMIZER_FILE, "optimizer state")
        if sharded:
            sharding.load_optimizer_state(model, optimizer, opt_state, str(ckpt / OPTIMIZER_FILE))
        else:
            optimizer.load_state_dict(opt_state)
        scheduler.load_state_dict(torch_load(ckpt / SCHEDULER_FILE, "LR scheduler state"))
        rng_path = ckpt / rng_file(rank)
        if rng_path.is_file():
            set_rng_state(torch_load(rng_path, "RNG state"))
    else:
        torch.manual_seed(seed_for("latentdit-process", t_cfg.seed, rank))
    raw_model = model
    if not sharded:
        model, optimizer = accelerator.prepare(model, optimizer)
    forward_model = torch.compile(model) if t_cfg.compile else model
    has_null = cfg.model.class_dropout_prob > 0

    loader = torch.utils.data.DataLoader(
        EpochIndexed(dataset),
        batch_sampler=StepBatchSampler(len(dataset), layout, t_cfg.seed, start_step, t_cfg.max_steps),
        num_workers=cfg.data.num_workers, pin_memory=device.type == "cuda",
        persistent_workers=False)
    if t_cfg.tensorboard:
        accelerator.init_trackers("tensorboard", config=_flat_hparams(cfg.to_dict()))
    sampler_grid = _SampleGrid(cfg, dataset, model_config, device) if t_cfg.sample_every > 0 else None
    metrics_path = run_dir / METRICS_FILE

    first_bad = torch.full((), -1, dtype=torch.long, device=device)
    check_every_step = device.type == "cpu"

    def check_finite(step: int) -> None:
        bad = accelerator.gather(first_bad.reshape(1)).max() if world > 1 else first_bad
        bad_step = int(bad.item())
        if bad_step >= 0:
            last = ckpts.latest()
            where = f"the last good checkpoint is {last}" if last else "no checkpoint was written"
            raise LatentDiTError(
                f"training stopped: the loss became NaN or inf at step {bad_step}; {where} (not overwritten). "
                "Lower train.lr, enable train.grad_clip, or use mixed_precision=no/bf16")

    def save_checkpoint(step: int) -> Path | None:
        check_finite(step)
        if is_main:
            ckpts.begin(step)
        accelerator.wait_for_everyone()
        tmp = ckpts.tmp_path(step)
        torch_save(rng_state(), tmp / rng_file(rank))
        if sharded:
            model_sd = sharding.full_model_state(model, keep=is_main)
            opt_sd = sharding.full_optimizer_state(model, optimizer, keep=is_main)
        else:
            model_sd, opt_sd = accelerator.get_state_dict(model), optimizer.state_dict()
        ema_sd = ema.state_dict(raw_model)
        if is_main:
            meta = dict(class_names=dataset.class_names, vae=dataset.vae,
                        diffusion={"noise_schedule": cfg.diffusion.noise_schedule,
                                   "diffusion_steps": cfg.diffusion.diffusion_steps})
            save_weights(model_sd, tmp / MODEL_FILE, model_config, **meta)
            save_weights(ema_sd, tmp / EMA_FILE, model_config, **meta)
            torch_save(opt_sd, tmp / OPTIMIZER_FILE)
            torch_save(scheduler.state_dict(), tmp / SCHEDULER_FILE)
        accelerator.wait_for_everyone()
        final = None
        if is_main:
            epoch, pos = divmod(step, steps_per_epoch)
            write_json(tmp / STATE_FILE, {
                "step": step, "epoch": epoch, "position": pos, "steps_per_epoch": steps_per_epoch,
                "global_batch_size": t_cfg.global_batch_size, "num_processes": world, "seed": t_cfg.seed,
                "model_config": model_config, "class_names": dataset.class_names,
                "config": cfg.to_dict(), "versions": _versions(), "time": time.time()})
            final = ckpts.commit(step)
        accelerator.wait_for_everyone()
        return final if is_main else ckpts.final_path(step)

    from tqdm.auto import tqdm

    progress = tqdm(total=t_cfg.max_steps, initial=start_step, disable=not is_main, desc="train",
                    dynamic_ncols=True)
    if is_main and ckpt is not None:
        progress.write(f"resumed from {ckpt} at step {start_step}")
    last_ckpt: Path | None = ckpt
    loss_sum = torch.zeros((), device=device)
    window_steps, window_t0 = 0, time.perf_counter()
    t_start = time.monotonic()
    stop_reason = "max_steps"
    data_iter = iter(loader)
    step = start_step
    latent_shape = tuple(dataset.latent_shape)
    try:
        while step < t_cfg.max_steps:
            rand = StepRandomness.draw(t_cfg.seed, step, t_cfg.global_batch_size, latent_shape,
                                       diffusion.num_timesteps, cfg.model.class_dropout_prob)
            step_loss = torch.zeros((), device=device)
            for a in range(t_cfg.grad_accum):
                x0, y = next(data_iter)
                x0 = x0.to(device, non_blocking=True)
                y = y.to(device, non_blocking=True)
                sync = a == t_cfg.grad_accum - 1
                if sharded:  # FSDP2: reduce-scatter the gradients on the last micro-batch only
                    model.set_requires_gradient_sync(sync)
                with contextlib.nullcontext() if sync or sharded else accelerator.no_sync(model):
                    loss = diffusion_loss(diffusion, forward_model, x0, y, rand.slice(layout.rows(a)), has_null)
                    if loss_hook is not None:
                        loss = loss_hook(step + 1, loss)
                    accelerator.backward(loss / t_cfg.grad_accum)
                step_loss += loss.detach() / t_cfg.grad_accum
            step += 1
            log_now = step % t_cfg.log_every == 0 or step == t_cfg.max_steps
            grad_norm = None
            if t_cfg.grad_clip > 0 or log_now:  # max_norm=inf only measures (scales by exactly 1)
                grad_norm = sharding.full_tensor(accelerator.clip_grad_norm_(
                    model.parameters(), t_cfg.grad_clip if t_cfg.grad_clip > 0 else math.inf))
            lr_used = optimizer.param_groups[0]["lr"]
            optimizer.step()
            if not accelerator.optimizer_step_was_skipped:
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            ema.update(raw_model, warmup_decay(t_cfg.ema_decay, step - 1) if t_cfg.ema_warmup else None)
            first_bad = torch.where((first_bad < 0) & ~torch.isfinite(step_loss),
                                    torch.full_like(first_bad, step), first_bad)
            loss_sum += step_loss
            window_steps += 1
            progress.update(1)
            if check_every_step or log_now:
                check_finite(step)

            if log_now:
                mean_loss = accelerator.reduce(loss_sum / window_steps, "mean") if world > 1 else loss_sum / window_steps
                now = time.perf_counter()
                steps_per_sec = window_steps / max(now - window_t0, 1e-9)
                row = {"step": step, "epoch": step // steps_per_epoch, "loss": float(mean_loss.item()),
                       "lr": lr_used,
                       "grad_norm": float(grad_norm) if grad_norm is not None else None,
                       "steps_per_sec": steps_per_sec, "img_per_sec": steps_per_sec * t_cfg.global_batch_size,
                       "elapsed_s": time.monotonic() - t_start}
                if is_main:
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps(row) + "\n")
                    postfix = dict(loss=f"{row['loss']:.4f}", img_s=f"{row['img_per_sec']:.1f}")
                    if t_cfg.max_minutes > 0:  # the step total is then only an upper bound
                        left = t_cfg.max_minutes - (time.monotonic() - t_start) / 60
                        postfix["budget_left"] = f"{max(left, 0.0):.1f}min"
                    progress.set_postfix(postfix)
                if t_cfg.tensorboard:
                    accelerator.log({k: v for k, v in row.items() if k != "step" and v is not None}, step=step)
                loss_sum = torch.zeros((), device=device)
                window_steps, window_t0 = 0, time.perf_counter()

            out_of_time = False
            if t_cfg.max_minutes > 0 and (world == 1 or log_now or step % t_cfg.ckpt_every == 0):
                # several processes agree through rank 0's clock (checked at log/checkpoint steps only)
                out_of_time = time.monotonic() - t_start >= t_cfg.max_minutes * 60
                if world > 1:
                    flag = broadcast(torch.tensor([float(out_of_time)], device=device), from_process=0)
                    out_of_time = bool(flag.item())
            if step % t_cfg.ckpt_every == 0 or step == t_cfg.max_steps or out_of_time:
                last_ckpt = save_checkpoint(step)
            if sampler_grid is not None and step % t_cfg.sample_every == 0:
                ema_sd = ema.state_dict(raw_model)  # gathers when sharded: every process takes part
                if is_main:
                    path = sampler_grid(ema_sd, step, run_dir / "samples" / f"step-{step:07d}.png")
                    progress.write(f"step {step}: sample grid {path}")
                accelerator.wait_for_everyone()
            if out_of_time:
                stop_reason = "max_minutes"
                if is_main:
                    progress.write(f"time budget train.max_minutes={t_cfg.max_minutes:g} reached at step {step}")
                break
    finally:
        progress.close()
        if t_cfg.tensorboard:
            accelerator.end_training()
    return TrainResult(run_dir=run_dir, step=step, last_checkpoint=last_ckpt, stop_reason=stop_reason)

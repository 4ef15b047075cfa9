"""The DiT training loop: accelerate (DDP, mixed precision) or FSDP2 sharding, the optimizer, EMA, checkpoints,
logging.

One call to :func:`train` runs (or resumes) a run directory::

    <run_dir>/config.yaml          resolved config
    <run_dir>/metrics.jsonl        one JSON line per logged step (loss averaged over all processes, and
                                   each regulariser's unweighted value under its name, e.g. layersync)
    <run_dir>/tensorboard/         the same scalars through accelerate's TensorBoard tracker
    <run_dir>/samples/step-*.png   EMA sample grids with guidance, decoded through the run's VAE
    <run_dir>/checkpoints/step-*/  see :mod:`latentdit.training.checkpoint`

The parts live next door: :mod:`~latentdit.training.state` builds the run (:class:`TrainState`) and
writes its checkpoints; :mod:`latentdit.engine` logs it and keeps its time budget. The loss comes from
the run's process object (``diffusion.process``: ddpm or flow), so nothing here knows which one it trains;
the representation regularisers of :mod:`latentdit.training.regularizers` are added to it.
Data order and per-step randomness follow :mod:`latentdit.training.data`, so the losses do not
depend on the number of processes and a resumed run repeats an uninterrupted one step for step.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import torch

from latentdit.config import Config
from latentdit.engine.runlog import RunLog
from latentdit.models.dit import Extras
from latentdit.training import sharding
from latentdit.training.data import StepRandomness
from latentdit.training.regularizers import InternalLoss, Regularizer
from latentdit.training.samples import SampleGrid
from latentdit.training.state import TrainState, check_finite, follows_budget, note_loss, save_checkpoint, setup

LossHook = Callable[[int, torch.Tensor], torch.Tensor]


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    last_checkpoint: Path | None
    stop_reason: str


class StepResult(NamedTuple):
    loss: torch.Tensor            # mean diffusion loss of the global batch on this process (on the device)
    lr: float                     # the learning rate the step used
    grad_norm: torch.Tensor | None  # measured when clipping or logging (on the device)
    terms: dict[str, torch.Tensor] = {}  # the regularisers' mean (unweighted) values, by name


def micro_batch_terms(process, forward_model: torch.nn.Module, x0: torch.Tensor, y: torch.Tensor,
                      rand: StepRandomness, label_dropout: bool,
                      regularizers: Sequence[Regularizer] = ()) -> dict[str, torch.Tensor]:
    """The mean diffusion loss of one micro-batch (key ``"loss"``) with the given times, noise and
    label-drop mask, and each regulariser's value (unweighted, under its name) on the block tokens of
    the same forward pass."""
    device = x0.device
    kwargs: dict[str, Any] = {"y": y}
    if label_dropout:
        kwargs["force_drop_ids"] = rand.drop.to(device, non_blocking=True)
    captured: list[Extras] = []
    wanted = tuple(sorted({i for r in regularizers for i in r.blocks}))
    internal = any(isinstance(r, InternalLoss) for r in regularizers)

    def capturing_model(x_t: torch.Tensor, t: torch.Tensor, **kw: Any) -> torch.Tensor:
        out, extras = forward_model(x_t, t, return_blocks=wanted, return_internal=internal, **kw)
        captured.append(extras)
        return out

    t, noise = rand.t.to(device, non_blocking=True), rand.noise.to(device, non_blocking=True)
    losses = process.training_losses(capturing_model if regularizers else forward_model, x0, t, noise=noise,
                                     model_kwargs=kwargs)
    terms = {"loss": losses["loss"].mean()}
    for r in regularizers:
        if isinstance(r, InternalLoss):  # the same loss on the internal head's prediction of the same pass
            head = process.training_losses(lambda *_, **__: captured[0].internal, x0, t, noise=noise,
                                           model_kwargs=kwargs)
            terms[r.name] = head["loss"].mean()
        else:
            terms[r.name] = r(captured[0].blocks)
    return terms


def micro_batch_loss(process, forward_model: torch.nn.Module, x0: torch.Tensor, y: torch.Tensor,
                     rand: StepRandomness, label_dropout: bool) -> torch.Tensor:
    """Mean diffusion loss of one micro-batch with the given times, noise and label-drop mask."""
    return micro_batch_terms(process, forward_model, x0, y, rand, label_dropout)["loss"]


def train_step(state: TrainState, batches: Iterator, loss_hook: LossHook | None = None,
               measure_grad_norm: bool = False) -> StepResult:
    """One optimizer step over ``train.grad_accum`` micro-batches: backward, clip, optimizer, LR schedule, EMA."""
    t, acc, model = state.cfg.train, state.accelerator, state.model
    rand = StepRandomness.draw(t.seed, state.step, t.global_batch_size, tuple(state.dataset.latent_shape),
                               state.process, state.cfg.model.class_dropout_prob)
    step_loss = torch.zeros((), device=state.device)
    step_terms = {r.name: torch.zeros((), device=state.device) for r in state.regularizers}
    objective = torch.zeros((), device=state.device)  # diffusion + weighted regularisers, for the NaN guard
    for a in range(t.grad_accum):
        x0, y = next(batches)
        x0, y = x0.to(state.device, non_blocking=True), y.to(state.device, non_blocking=True)
        sync = a == t.grad_accum - 1  # gradients are reduced across processes on the last micro-batch only
        if state.sharded:
            model.set_requires_gradient_sync(sync)
        with contextlib.nullcontext() if sync or state.sharded else acc.no_sync(model):
            terms = micro_batch_terms(state.process, state.forward_model, x0, y,
                                      rand.slice(state.layout.rows(a)), state.label_dropout, state.regularizers)
            loss = terms["loss"]
            if loss_hook is not None:
                loss = loss_hook(state.step + 1, loss)
            total = loss
            for r in state.regularizers:
                total = total + r.weight * terms[r.name]
            acc.backward(total / t.grad_accum)
        step_loss += loss.detach() / t.grad_accum
        for r in state.regularizers:
            step_terms[r.name] += terms[r.name].detach() / t.grad_accum
        objective += total.detach() / t.grad_accum
    state.step += 1
    grad_norm = None
    if t.grad_clip > 0 or measure_grad_norm:  # max_norm=inf only measures (scales by exactly 1)
        grad_norm = sharding.full_tensor(acc.clip_grad_norm_(
            model.parameters(), t.grad_clip if t.grad_clip > 0 else math.inf))
    lr = state.optimizer.param_groups[0]["lr"]
    state.optimizer.step()
    if not acc.optimizer_step_was_skipped:
        state.scheduler.step()
    state.optimizer.zero_grad(set_to_none=True)
    state.ema.update(state.raw_model, state.ema.decay_at(state.step))
    note_loss(state, objective if state.regularizers else step_loss)
    return StepResult(step_loss, lr, grad_norm, step_terms)


def write_sample_grid(state: TrainState, grid: SampleGrid, log: RunLog) -> None:
    """The EMA's sample grid of this step (every process takes part: the EMA is gathered when sharded)."""
    ema_sd = state.ema.state_dict(state.raw_model)
    if state.is_main:
        path = grid(ema_sd, state.step, state.run_dir / "samples" / f"step-{state.step:07d}.png")
        log.write(f"step {state.step}: sample grid {path}")
    state.accelerator.wait_for_everyone()


def train(cfg: Config, resume: str | None = None, *, loss_hook: LossHook | None = None) -> TrainResult:
    """Train (or resume, ``resume="auto"`` or a path) the run described by ``cfg``.

    ``loss_hook(step, loss) -> loss`` is a test seam called on every micro-batch loss (e.g. to inject
    a NaN). Raises :class:`LatentDiTError` for bad input, before anything is written.
    """
    t = cfg.train
    state = setup(cfg, resume)
    log = RunLog(state.accelerator, state.run_dir, start_step=state.step, max_steps=t.max_steps,
                 max_minutes=t.max_minutes, batch_size=t.global_batch_size, tensorboard=t.tensorboard,
                 hparams=cfg.to_dict(), steps_per_epoch=state.steps_per_epoch, spent_s=state.budget.elapsed_before_s)
    budget, every_step = state.budget, follows_budget(cfg)  # a time-based LR schedule measures every step
    grid = SampleGrid(cfg, state.dataset, state.model_config, state.process, state.device) \
        if t.sample_every > 0 else None
    if state.resumed_from is not None:
        log.write(f"resumed from {state.resumed_from} at step {state.step}")
    last_ckpt, stop_reason = state.resumed_from, "max_steps"
    batches = iter(state.loader)
    try:
        while state.step < t.max_steps:
            log_now = (state.step + 1) % t.log_every == 0 or state.step + 1 == t.max_steps
            out = train_step(state, batches, loss_hook, measure_grad_norm=log_now)
            log.add(state.step, {"loss": out.loss, **out.terms})
            if state.device.type == "cpu" or log_now:  # a host sync: every step on CPU only
                check_finite(state)
            if log_now:
                log.log(state.step, out.lr, out.grad_norm)
            # several processes ask at log and checkpoint steps only (the question is a collective), or at
            # every step when the LR schedule follows the budget
            out_of_time = budget.spent(log_now or state.step % t.ckpt_every == 0 or every_step)
            if state.step % t.ckpt_every == 0 or state.step == t.max_steps or out_of_time:
                last_ckpt = save_checkpoint(state)
            if grid is not None and state.step % t.sample_every == 0:
                write_sample_grid(state, grid, log)
            if out_of_time:
                stop_reason = "max_minutes"
                log.write(f"time budget train.max_minutes={t.max_minutes:g} reached at step {state.step}")
                break
    finally:
        log.close()
    return TrainResult(run_dir=state.run_dir, step=state.step, last_checkpoint=last_ckpt, stop_reason=stop_reason)

"""What a training run reports while it runs: the progress bar, ``metrics.jsonl``, TensorBoard, sample grids.

Everything here acts on the main process only, except :meth:`RunLog.log`'s loss average (a
collective when there are several processes).

The progress bar counts steps, or, when ``train.max_minutes`` bounds the run, minutes of that budget
(``3.2/5.0 min``), so its ETA is the time the run will really take: the budget left, or the time to
``train.max_steps`` at the measured step rate when that comes first.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import torch

from latentdit.config import Config
from latentdit.seeding import seed_for

METRICS_FILE = "metrics.jsonl"
TIME_BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total:.1f} min{postfix}"  # tqdm puts ", " before the postfix


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


class ProgressBar:
    """A tqdm bar over steps, or over the minutes of a time budget (``max_minutes > 0``).

    With a budget the bar's total is the number of minutes the run will last: the budget, or less when
    ``max_steps`` will be reached first at the step rate seen so far; the ETA is that total minus the
    minutes spent. ``clock`` (monotonic seconds) is a test seam.
    """

    def __init__(self, start_step: int, max_steps: int, max_minutes: float, *, disable: bool = False,
                 clock: Callable[[], float] = time.monotonic, **tqdm_kwargs: Any) -> None:
        from tqdm.auto import tqdm

        self.start_step, self.max_steps, self.max_minutes = start_step, max_steps, max_minutes
        self.clock = clock
        self.t0 = clock()
        self.step = start_step
        self.values: dict[str, str] = {}
        if max_minutes > 0:
            self.bar = tqdm(total=max_minutes, initial=0.0, disable=disable, desc="train", unit="min",
                            bar_format=TIME_BAR_FORMAT, dynamic_ncols=True, **tqdm_kwargs)
            self._show_budget()
        else:
            self.bar = tqdm(total=max_steps, initial=start_step, disable=disable, desc="train", unit="step",
                            dynamic_ncols=True, **tqdm_kwargs)

    def _show_budget(self, refresh: bool = False) -> None:
        from tqdm import tqdm

        elapsed = (self.clock() - self.t0) / 60
        total = self.max_minutes
        steps_done = self.step - self.start_step
        if steps_done > 0 and elapsed > 0:  # at this step rate max_steps may come before the budget runs out
            total = min(total, elapsed + (self.max_steps - self.step) * elapsed / steps_done)
        self.bar.total = max(total, elapsed)
        self.bar.n = min(elapsed, self.bar.total)
        eta = tqdm.format_interval(max(self.bar.total - elapsed, 0.0) * 60)
        self.bar.set_postfix_str(", ".join([f"eta {eta}", f"step {self.step}"]
                                           + [f"{k}={v}" for k, v in self.values.items()]), refresh=refresh)

    def update(self, step: int) -> None:
        """The run has reached ``step``."""
        done, self.step = step - self.step, step
        if self.max_minutes > 0:
            self._show_budget()
            self.bar.update(0)  # redraws at tqdm's usual interval
        else:
            self.bar.update(done)

    def set_postfix(self, values: dict[str, str]) -> None:
        if self.max_minutes > 0:
            self.values = dict(values)
            self._show_budget(refresh=True)
        else:
            self.bar.set_postfix(values)

    def write(self, text: str) -> None:
        self.bar.write(text)

    def close(self) -> None:
        self.bar.close()


class RunLog:
    """Step losses averaged over ``train.log_every`` steps and all processes, written to ``metrics.jsonl``,
    TensorBoard and the progress bar."""

    def __init__(self, cfg: Config, accelerator, run_dir: Path, start_step: int, steps_per_epoch: int) -> None:
        self.cfg, self.accelerator, self.steps_per_epoch = cfg, accelerator, steps_per_epoch
        self.is_main = accelerator.is_main_process
        self.metrics_path = run_dir / METRICS_FILE
        t = cfg.train
        self.bar = ProgressBar(start_step, t.max_steps, t.max_minutes, disable=not self.is_main)
        if t.tensorboard:
            accelerator.init_trackers("tensorboard", config=_flat_hparams(cfg.to_dict()))
        self.loss_sum = torch.zeros((), device=accelerator.device)
        self.window_steps, self.window_t0 = 0, time.perf_counter()
        self.t_start = time.monotonic()

    def elapsed_s(self) -> float:
        return time.monotonic() - self.t_start

    def add(self, step: int, step_loss: torch.Tensor) -> None:
        """Count one finished step (its loss stays on the device until the next :meth:`log`)."""
        self.loss_sum += step_loss
        self.window_steps += 1
        self.bar.update(step)

    def log(self, step: int, lr: float, grad_norm: torch.Tensor | float | None) -> dict[str, Any]:
        """Write the metrics row of ``step`` (collective: the loss is averaged over the processes)."""
        t = self.cfg.train
        mean = self.loss_sum / self.window_steps
        if self.accelerator.num_processes > 1:
            mean = self.accelerator.reduce(mean, "mean")
        steps_per_sec = self.window_steps / max(time.perf_counter() - self.window_t0, 1e-9)
        row = {"step": step, "epoch": step // self.steps_per_epoch, "loss": float(mean.item()), "lr": lr,
               "grad_norm": float(grad_norm) if grad_norm is not None else None, "steps_per_sec": steps_per_sec,
               "img_per_sec": steps_per_sec * t.global_batch_size, "elapsed_s": self.elapsed_s()}
        if self.is_main:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            self.bar.set_postfix(dict(loss=f"{row['loss']:.4f}", img_s=f"{row['img_per_sec']:.1f}"))
        if t.tensorboard:
            self.accelerator.log({k: v for k, v in row.items() if k != "step" and v is not None}, step=step)
        self.loss_sum = torch.zeros((), device=self.accelerator.device)
        self.window_steps, self.window_t0 = 0, time.perf_counter()
        return row

    def write(self, text: str) -> None:
        if self.is_main:
            self.bar.write(text)

    def close(self) -> None:
        self.bar.close()
        if self.cfg.train.tensorboard:
            self.accelerator.end_training()


class SampleGrid:
    """Periodic EMA sample grid with guidance, sampled with the run's process and decoded through the
    run's VAE (main process only)."""

    def __init__(self, cfg: Config, dataset, model_config: dict[str, Any], process, device: torch.device) -> None:
        self.cfg, self.dataset, self.model_config, self.process, self.device = cfg, dataset, model_config, process, device
        self.model = None
        self.vae = None

    def __call__(self, ema_state: dict[str, torch.Tensor], step: int, path: Path) -> Path:
        from latentdit.autoencoder import VAE
        from latentdit.models import DiT
        from latentdit.sampling import SamplerSettings, sample_latents
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
            latents = sample_latents(self.model, y, SamplerSettings(num_steps=cfg.diffusion.sample_steps,
                                                                    cfg_scale=scale),
                                     process=self.process, noise=gen)
            images = self.vae.decode(latents, ds.latent_norm)
        names = [ds.class_names[c] if c < len(ds.class_names) else str(c) for c in classes]
        labels = [f"{n} (cfg {scale:g})" if i == 0 else n for i, n in enumerate(names)]
        return save_labeled_grid(images, labels, path, nrow=seeds)

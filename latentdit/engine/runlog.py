"""What a training run reports while it runs: the progress bar, ``metrics.jsonl`` and TensorBoard.

Everything here acts on the main process only, except :meth:`RunLog.log`'s averages over the processes
(a collective when there are several).

The progress bar counts steps, or, when ``max_minutes`` bounds the run, minutes of that budget
(``3.2/5.0 min``), so its ETA is the time the run will really take: the budget left, or the time to
``max_steps`` at the measured step rate when that comes first.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

METRICS_FILE = "metrics.jsonl"
TIME_BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total:.1f} min{postfix}"  # tqdm puts ", " before the postfix


def flat_hparams(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config dict as ``section.field`` → scalar (what TensorBoard's hparams take)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_hparams(v, key + "."))
        elif isinstance(v, (bool, int, float, str)):
            out[key] = v
        else:
            out[key] = str(v)
    return out


def truncate_metrics(path: Path, step: int) -> None:
    """Keep only metric rows of steps ≤ ``step`` (rows a killed run logged after its last checkpoint)."""
    from latentdit.io import atomic_write

    if not path.is_file():
        return
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


class ProgressBar:
    """A tqdm bar over steps, or over the minutes of a time budget (``max_minutes > 0``).

    With a budget the bar's total is the number of minutes the run will last: the budget, or less when
    ``max_steps`` will be reached first at the step rate seen so far; the ETA is that total minus the
    minutes spent, ``spent_s`` of them before this process (a resumed run continues its budget).
    ``clock`` (monotonic seconds) is a test seam.
    """

    def __init__(self, start_step: int, max_steps: int, max_minutes: float, *, disable: bool = False,
                 desc: str = "train", clock: Callable[[], float] = time.monotonic, spent_s: float = 0.0,
                 **tqdm_kwargs: Any) -> None:
        from tqdm.auto import tqdm

        self.start_step, self.max_steps, self.max_minutes = start_step, max_steps, max_minutes
        self.spent_min = spent_s / 60
        self.clock = clock
        self.t0 = clock()
        self.step = start_step
        self.values: dict[str, str] = {}
        if max_minutes > 0:
            self.bar = tqdm(total=max_minutes, initial=0.0, disable=disable, desc=desc, unit="min",
                            bar_format=TIME_BAR_FORMAT, dynamic_ncols=True, **tqdm_kwargs)
            self._show_budget()
        else:
            self.bar = tqdm(total=max_steps, initial=start_step, disable=disable, desc=desc, unit="step",
                            dynamic_ncols=True, **tqdm_kwargs)

    def _show_budget(self, refresh: bool = False) -> None:
        from tqdm import tqdm

        here = (self.clock() - self.t0) / 60  # this process's minutes: its step rate
        elapsed = self.spent_min + here
        total = self.max_minutes
        steps_done = self.step - self.start_step
        if steps_done > 0 and here > 0:  # at this step rate max_steps may come before the budget runs out
            total = min(total, elapsed + (self.max_steps - self.step) * here / steps_done)
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
    """Step values (``loss`` and any other named parts) averaged over the steps of a logging window and
    all processes, written with the learning rate, throughput and thread count to ``metrics.jsonl``,
    TensorBoard and the progress bar.

    ``batch_size``: images per step (all processes together); ``steps_per_epoch``: adds an ``epoch``
    column when given; ``hparams``: the run's config dict, given to TensorBoard (``tensorboard=True``
    needs an accelerator made with the TensorBoard tracker); ``spent_s``: seconds of the time budget a
    resumed run had used before (the bar continues from there).
    """

    def __init__(self, accelerator, run_dir: Path, *, start_step: int, max_steps: int, max_minutes: float,
                 batch_size: int, tensorboard: bool, hparams: Mapping[str, Any] | None = None,
                 steps_per_epoch: int | None = None, desc: str = "train", spent_s: float = 0.0) -> None:
        self.accelerator, self.batch_size, self.steps_per_epoch = accelerator, batch_size, steps_per_epoch
        self.tensorboard = tensorboard
        self.is_main = accelerator.is_main_process
        self.metrics_path = Path(run_dir) / METRICS_FILE
        self.bar = ProgressBar(start_step, max_steps, max_minutes, disable=not self.is_main, desc=desc,
                               spent_s=spent_s)
        if tensorboard:
            accelerator.init_trackers("tensorboard", config=flat_hparams(hparams or {}))
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.window_steps, self.window_t0 = 0, time.perf_counter()
        self.t_start = time.monotonic()

    def elapsed_s(self) -> float:
        return time.monotonic() - self.t_start

    def add(self, step: int, values: Mapping[str, torch.Tensor | float]) -> None:
        """Count one finished step with its values (tensors stay on the device until :meth:`log`)."""
        for name, value in values.items():
            if name not in self.sums:
                self.sums[name] = torch.zeros((), device=self.accelerator.device)
                self.counts[name] = 0
            self.sums[name] += value
            self.counts[name] += 1
        self.window_steps += 1
        self.bar.update(step)

    def log(self, step: int, lr: float, grad_norm: torch.Tensor | float | None = None) -> dict[str, Any]:
        """Write the metrics row of ``step`` (collective: the values are averaged over the processes)."""
        names = list(self.sums)
        means = [self.sums[k] / self.counts[k] for k in names]
        if self.accelerator.num_processes > 1 and names:
            means = list(self.accelerator.reduce(torch.stack(means), "mean").unbind())
        steps_per_sec = self.window_steps / max(time.perf_counter() - self.window_t0, 1e-9)
        row: dict[str, Any] = {"step": step}
        if self.steps_per_epoch:
            row["epoch"] = step // self.steps_per_epoch
        row.update({k: float(v.item()) for k, v in zip(names, means)})
        row.update({"lr": lr, "grad_norm": float(grad_norm) if grad_norm is not None else None,
                    "steps_per_sec": steps_per_sec, "img_per_sec": steps_per_sec * self.batch_size,
                    "threads": torch.get_num_threads(), "elapsed_s": self.elapsed_s()})
        if self.is_main:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            shown = {k: f"{row[k]:.4g}" for k in names}
            if "loss" in shown:
                shown["loss"] = f"{row['loss']:.4f}"
            self.bar.set_postfix(dict(shown, img_s=f"{row['img_per_sec']:.1f}"))
        if self.tensorboard:
            self.accelerator.log({k: v for k, v in row.items() if k != "step" and v is not None}, step=step)
        self.sums, self.counts = {}, {}
        self.window_steps, self.window_t0 = 0, time.perf_counter()
        return row

    def write(self, text: str) -> None:
        if self.is_main:
            self.bar.write(text)

    def close(self) -> None:
        self.bar.close()
        if self.tensorboard:
            self.accelerator.end_training()

"""The main job end to end on the offline default: Fashion-MNIST → bundled KL-f8 VAE latents →
class-conditional DiT → guided samples → FID/KID, with a report folder.

    python tools/demo.py                       # everything, into demo_output/
    python tools/demo.py --only fid report     # rerun chosen stages (finished work is kept)

Each stage runs one of the project's tools in a subprocess (the very command a user would type),
so the report can list the exact command of every stage and any one of them can be rerun alone.
Every stage is resumable: extraction skips finished shards, training resumes from its last
checkpoint (``--resume auto``), many-sample runs keep finished chunks and feature statistics are
cached, so running the demo again after an interruption only does what is missing.

Output folder layout::

    <out>/latents/train/            shards + manifest.json (tools/extract.py)
    <out>/reference/test.npz        held-out Fashion-MNIST test images, ADM layout (arr_0)
    <out>/train/                    the training run (config.yaml, metrics.jsonl, checkpoints/, samples/)
    <out>/samples/cfg-<s>/          samples.npz per guidance scale (tools/sample_ddp.py)
    <out>/metrics/cfg-<s>.json      FID / KID / precision / recall (tools/fid.py)
    <out>/report/                   README.md, samples grid, loss curve, config.yaml, metrics.json
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from latentdit.cli import make_parser, non_negative_float, parse_with_overrides, positive_int, run_main
from latentdit.distributed import EXIT_USER_ERROR
from latentdit.errors import LatentDiTError, ReportedError
from latentdit.io import atomic_path, check_output_folder, read_json, write_json
from latentdit.sampling import SAMPLERS

REPO_ROOT = Path(__file__).resolve().parents[1]  # this file is tools/demo.py
DEMO_CONFIG = REPO_ROOT / "configs" / "fashion_mnist.yaml"
STAGES = ("extract", "reference", "train", "grid", "samples", "fid", "report")


@dataclass
class DemoSettings:
    """What the demo trades against its time budget (see the README's table of trade-offs)."""

    out: Path
    image_size: int = 64
    extract_limit: int | None = 10000       # None: all 60,000 training images
    # Fashion-MNIST footwear all faces left: horizontal flips would teach the model right-facing shoes
    # that the held-out images never show, so the demo stores and trains without flips.
    flip: bool = False
    train_minutes: float = 5.0
    train_overrides: list[str] = field(default_factory=list)
    cfg_scales: tuple[float, ...] = (1.0, 1.5, 3.0)
    grid_cfg_scale: float = 3.0
    samples_per_class: int = 8              # grid columns
    fid_samples: int = 500                  # generated images per guidance scale
    reference_samples: int = 500            # held-out test images
    sampler: str = "heun"                   # the flow recipe's fast sampler: 10 Heun steps = 19 model evaluations
    num_steps: int = 10
    seed: int = 0
    fid_batch_size: int = 50
    data_dir: Path | None = None            # where latents/ and reference/ live (default: out); lets runs share them


@dataclass
class StageResult:
    name: str
    command: str
    seconds: float


def _tool(name: str) -> str:
    return str(REPO_ROOT / "tools" / name)


def _display(cmd: Sequence[str]) -> str:
    """A command as the user would type it from the repository root."""
    shown = []
    for part in cmd:
        if part == sys.executable:
            part = "python"
        elif part == str(Path(sys.executable).with_name("accelerate")):
            part = "accelerate"
        else:  # paths inside the repository, also in key=value overrides, relative to its root
            part = part.replace(str(REPO_ROOT) + os.sep, "")
        shown.append(part)
    return shlex.join(shown)


def _accelerate_launch() -> list[str]:
    """``accelerate launch`` for one CPU/GPU process, with the defaults spelled out (no config file needed),
    through ``python -m latentdit.launch``: a user error in the worker ends in its one line and exit status 2."""
    return [sys.executable, "-m", "latentdit.launch", "--num_processes", "1", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no"]


def _fmt_scale(s: float) -> str:
    return f"{s:g}"


class Demo:
    """Runs the stages in order and writes the report. ``log`` receives progress lines."""

    def __init__(self, settings: DemoSettings, log=print):
        self.s = settings
        self.out = Path(settings.out).expanduser().resolve()
        self.log = log
        self.results: list[StageResult] = []

    # -- paths -------------------------------------------------------------------------------------
    @property
    def data_dir(self) -> Path:
        return Path(self.s.data_dir).expanduser().resolve() if self.s.data_dir else self.out

    @property
    def latents_dir(self) -> Path:
        return self.data_dir / "latents" / "train"

    @property
    def reference_npz(self) -> Path:
        return self.data_dir / "reference" / "test.npz"

    @property
    def run_dir(self) -> Path:
        return self.out / "train"

    @property
    def report_dir(self) -> Path:
        return self.out / "report"

    def samples_dir(self, scale: float) -> Path:
        return self.out / "samples" / f"cfg-{_fmt_scale(scale)}"

    def metrics_json(self, scale: float) -> Path:
        return self.out / "metrics" / f"cfg-{_fmt_scale(scale)}.json"

    # -- running -----------------------------------------------------------------------------------
    def _run(self, name: str, cmd: list[str]) -> None:
        shown = _display(cmd)
        self.log(f"\n=== [{name}] {shown}")
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO_ROOT)
        seconds = time.perf_counter() - start
        if proc.returncode == EXIT_USER_ERROR:  # the stage printed its one-line message
            raise ReportedError(f"demo stage '{name}' stopped on a user error")
        if proc.returncode != 0:
            raise LatentDiTError(f"demo stage '{name}' failed (exit status {proc.returncode}); its output is above. "
                                 f"Fix the problem and run the demo again: finished stages are kept. Command: {shown}")
        self.results.append(StageResult(name, shown, seconds))
        self.log(f"=== [{name}] done in {seconds:.1f} s")

    def _record(self, name: str, shown: str, start: float) -> None:
        seconds = time.perf_counter() - start
        self.results.append(StageResult(name, shown, seconds))
        self.log(f"=== [{name}] done in {seconds:.1f} s")

    def checkpoint(self) -> Path:
        """The EMA weights of the run's latest checkpoint."""
        ckpts = sorted((self.run_dir / "checkpoints").glob("step-*"))
        if not ckpts:
            raise LatentDiTError(f"no checkpoint in {self.run_dir / 'checkpoints'}; run the 'train' stage first")
        return ckpts[-1] / "ema.safetensors"

    # -- stages ------------------------------------------------------------------------------------
    def stage_extract(self) -> None:
        cmd = [sys.executable, _tool("extract.py"), "--data", "fashion-mnist", "--split", "train",
               "--image-size", str(self.s.image_size), "--out", str(self.latents_dir)]
        if self.s.extract_limit:
            cmd += ["--limit", str(self.s.extract_limit)]
        if not self.s.flip:
            cmd.append("--no-flip")
        self._run("extract", cmd)

    def stage_reference(self) -> None:
        """Held-out test images (the first N of the balanced t10k split) as an ADM-style npz."""
        from latentdit.data.fashion_mnist import FashionMNIST

        shown = _display([sys.executable, _tool("demo.py"), "--out", str(self.out), "--only", "reference"])
        self.log(f"\n=== [reference] {shown}")
        start = time.perf_counter()
        dataset = FashionMNIST(split="test", image_size=self.s.image_size)
        n = min(self.s.reference_samples, len(dataset))
        images = np.stack([dataset.image_uint8(i) for i in range(n)])
        if images.ndim == 3:  # grey → RGB, as the VAE and the samples see them
            images = np.repeat(images[..., None], 3, axis=-1)
        with atomic_path(self.reference_npz) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, arr_0=images)
        self._record("reference", shown, start)

    @property
    def train_done_marker(self) -> Path:
        return self.run_dir / "demo-train-finished"

    def stage_train(self) -> None:
        """Train for the time budget. A finished run is not trained again (its checkpoint is what the
        later stages and their finished chunks refer to); an interrupted one resumes."""
        if self.train_done_marker.exists():
            self.log(f"\n=== [train] already finished ({self.checkpoint().parent.name}); "
                     f"delete {self.run_dir} to train again")
            return
        cmd = _accelerate_launch() + [_tool("train.py"), "--config", str(DEMO_CONFIG), "--resume", "auto",
                                      *self.train_overrides()]
        self._run("train", cmd)
        self.train_done_marker.write_text(f"{self.checkpoint()}\n")

    def train_overrides(self) -> list[str]:
        """The config overrides of the training stage: the demo's own, then the user's."""
        return [f"data.latents={self.latents_dir}", f"train.run_dir={self.run_dir}",
                f"train.max_minutes={self.s.train_minutes:g}", f"data.flip={str(self.s.flip).lower()}",
                f"train.seed={self.s.seed}", *self.s.train_overrides]

    def stage_grid(self) -> None:
        cmd = [sys.executable, _tool("sample.py"), "--ckpt", str(self.checkpoint()),
               "--samples-per-label", str(self.s.samples_per_class),
               "--cfg-scale", f"{self.s.grid_cfg_scale:g}", "--sampler", self.s.sampler,
               "--num-steps", str(self.s.num_steps), "--seed", str(self.s.seed),
               "--out", str(self.report_dir / "samples.png"),
               "--trajectory", str(self.report_dir / "trajectory.png")]
        self._run("grid", cmd)

    def stage_samples(self) -> None:
        for scale in self.s.cfg_scales:
            cmd = [sys.executable, _tool("sample_ddp.py"), "--ckpt", str(self.checkpoint()),
                   "--num-samples", str(self.s.fid_samples), "--cfg-scale", f"{scale:g}",
                   "--sampler", self.s.sampler, "--num-steps", str(self.s.num_steps),
                   "--seed", str(self.s.seed), "--out-dir", str(self.samples_dir(scale))]
            self._run(f"samples cfg {scale:g}", cmd)

    def stage_fid(self) -> None:
        for scale in self.s.cfg_scales:
            cmd = [sys.executable, _tool("fid.py"), str(self.reference_npz),
                   str(self.samples_dir(scale) / "samples.npz"), "--batch-size", str(self.s.fid_batch_size),
                   "--json", str(self.metrics_json(scale))]
            self._run(f"fid cfg {scale:g}", cmd)

    def stage_report(self) -> Path:
        from latentdit.visualize import save_line_plot

        self.report_dir.mkdir(parents=True, exist_ok=True)
        metrics_file = self.run_dir / "metrics.jsonl"
        steps, losses = [], []
        if metrics_file.exists():
            for line in metrics_file.read_text().splitlines():
                rec = json.loads(line)
                if "loss" in rec and "step" in rec:
                    steps.append(rec["step"])
                    losses.append(rec["loss"])
        if steps:
            save_line_plot(steps, losses, self.report_dir / "loss.png", title="training loss (all processes)",
                           xlabel="step", ylabel="loss")
        if (self.run_dir / "config.yaml").exists():
            shutil.copyfile(self.run_dir / "config.yaml", self.report_dir / "config.yaml")
        table = {}
        for scale in self.s.cfg_scales:
            if self.metrics_json(scale).exists():
                table[_fmt_scale(scale)] = read_json(self.metrics_json(scale), "metrics file")
        write_json(self.report_dir / "metrics.json", table)
        summary = {"stages": [r.__dict__ for r in self.results], "settings": _settings_json(self.s),
                   "machine": _machine()}
        timings_file = self.report_dir / "timings.json"
        if timings_file.exists():  # keep timings of stages not rerun this time
            old = {r["name"]: r for r in read_json(timings_file, "timings file").get("stages", [])}
            new = {r.name for r in self.results}
            summary["stages"] = [r for name, r in old.items() if name not in new] + summary["stages"]
        write_json(timings_file, summary)
        path = self.report_dir / "README.md"
        with atomic_path(path) as tmp:
            tmp.write_text(_report_markdown(self, table, summary, steps, losses))
        self.log(f"\nreport: {path}")
        return path

    def run(self, only: Sequence[str] | None = None) -> Path | None:
        stages = list(only) if only else list(STAGES)
        self.check(stages)
        self.out.mkdir(parents=True, exist_ok=True)
        total = time.perf_counter()
        report = None
        for name in STAGES:
            if name in stages:
                if name == "report":
                    report = self.stage_report()
                else:
                    getattr(self, f"stage_{name}")()
        self.log(f"\ndemo finished in {(time.perf_counter() - total) / 60:.1f} min")
        return report


    def check(self, stages: Sequence[str]) -> None:
        """Everything the chosen stages need that is known now: raises :class:`LatentDiTError` before the first
        stage instead of after minutes of work."""
        from latentdit.config import load_config

        unknown = [s for s in stages if s not in STAGES]
        if unknown:
            raise LatentDiTError(f"unknown demo stage(s) {unknown}; valid stages: {', '.join(STAGES)}")
        check_output_folder(self.out, "--out")
        cfg = load_config(DEMO_CONFIG, self.train_overrides())  # every override, as the training tool checks it
        if {"grid", "samples"} & set(stages):  # the sampler settings, against the process trained with
            from latentdit.diffusion import build_process
            from latentdit.sampling import SamplerSettings

            process = build_process(cfg.diffusion)
            for scale in (self.s.grid_cfg_scale, *self.s.cfg_scales):
                # the demo guides every latent channel, so their number plays no part here
                SamplerSettings(sampler=self.s.sampler, num_steps=self.s.num_steps,
                                cfg_scale=scale).resolved(process, in_channels=cfg.model.in_channels or 1)
        if "extract" not in stages and "train" in stages and not self.train_done_marker.exists() \
                and not (self.latents_dir / "manifest.json").is_file():
            raise LatentDiTError(f"nothing to train on: no latents in {self.latents_dir}; run the 'extract' "
                                 "stage first (or the whole demo)")
        if "train" not in stages and {"grid", "samples"} & set(stages):
            self.checkpoint()
        if "fid" in stages:
            needed = [] if "reference" in stages else [self.reference_npz]
            if "samples" not in stages:
                needed += [self.samples_dir(scale) / "samples.npz" for scale in self.s.cfg_scales]
            missing = [p for p in needed if not p.is_file()]
            if missing:
                stage = "reference" if missing[0] == self.reference_npz else "samples"
                raise LatentDiTError(f"nothing to evaluate: {missing[0]} does not exist; run the '{stage}' stage "
                                     "first (or the whole demo)")


def _settings_json(s: DemoSettings) -> dict:
    d = dict(s.__dict__)
    d["out"] = str(d["out"])
    d["data_dir"] = str(d["data_dir"]) if d["data_dir"] else None
    d["cfg_scales"] = list(d["cfg_scales"])
    return d


def _machine() -> dict:
    import torch

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def _report_markdown(demo: Demo, table: dict, summary: dict, steps: list, losses: list) -> str:
    s = demo.s
    lines = ["# latentdit demo report", "",
             f"Fashion-MNIST at {s.image_size}×{s.image_size} through the bundled KL-f8 VAE; a class-conditional "
             f"DiT trained for {s.train_minutes:g} min on CPU; {s.sampler}-{s.num_steps} samples; FID/KID of "
             f"{s.fid_samples} guided samples per scale (balanced labels) against {s.reference_samples} held-out "
             "test images.", "",
             f"## Samples (one row per class, cfg {s.grid_cfg_scale:g}, {s.sampler}-{s.num_steps})", "",
             "![samples](samples.png)", ""]
    if (demo.report_dir / "trajectory.png").exists():
        lines += ["## Denoising trajectory", "",
                  "For the first sample of a few classes: the current state x_t (decoded) and the model's estimate of "
                  "the clean image at that point of the chain, from pure noise (left) to the sample (right).", "",
                  "![trajectory](trajectory.png)", ""]
    if steps:
        lines += ["## Training loss", "", "![loss](loss.png)", "",
                  f"{len(steps)} logged points, last step {steps[-1]}, last loss {losses[-1]:.4f}.", ""]
    lines += ["## FID / KID by guidance scale", "",
              f"Protocol: {s.fid_samples} samples per scale with balanced labels, {s.sampler}-{s.num_steps}, seed "
              f"{s.seed}; reference: the first {s.reference_samples} Fashion-MNIST test images (never trained on); "
              "TF-Inception pool3 features.", "",
              "| cfg scale | FID | KID ×1000 (± std) | precision | recall |", "|---|---|---|---|---|"]
    for scale, m in table.items():
        kid = m.get("kid_mean")
        kid_s = f"{kid * 1000:.2f} ± {m.get('kid_std', 0) * 1000:.2f}" if kid is not None else "—"
        pr = (f"{m['precision']:.3f}", f"{m['recall']:.3f}") if "precision" in m else ("—", "—")
        lines.append(f"| {scale} | {m.get('fid', float('nan')):.2f} | {kid_s} | {pr[0]} | {pr[1]} |")
    subsets = sorted({(m["kid_subsets"], m["kid_subset_size"]) for m in table.values() if m.get("kid_subsets")})
    spread = (f" KID's ± is the standard deviation of its estimate over {subsets[0][0]} random subsets of "
              f"{subsets[0][1]} images of each set (at most half of a set, so the subsets differ and ± shows how "
              "much the number moves with the sample)." if len(subsets) == 1 else "")
    lines += ["", "FID at a few hundred samples is biased upwards; KID is unbiased, so compare KID across runs."
              + spread, "",
              "## Stages: time and the command to rerun each", "", "| stage | seconds | command |", "|---|---|---|"]
    for r in summary["stages"]:
        lines.append(f"| {r['name']} | {r['seconds']:.1f} | `{r['command']}` |")
    m = summary["machine"]
    lines += ["", f"Machine: {m['processor']}, {m['cpu_count']} CPUs, {m['platform']}, torch {m['torch']}"
              + (f", GPU {m['cuda']}" if m["cuda"] else ", no GPU") + ".", "",
              "The resolved training config is in [config.yaml](config.yaml); all figures in "
              "[metrics.json](metrics.json) and [timings.json](timings.json).", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = make_parser(__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("demo_output"), help="output folder (the report is in OUT/report)")
    p.add_argument("--only", nargs="+", choices=STAGES, metavar="STAGE",
                   help=f"run only these stages: {', '.join(STAGES)}")
    p.add_argument("--train-minutes", type=non_negative_float, default=DemoSettings.train_minutes,
                   help="training time budget in minutes")
    p.add_argument("--extract-limit", type=positive_int, default=DemoSettings.extract_limit,
                   help="encode only the first N of the 60,000 training images")
    p.add_argument("--fid-samples", type=positive_int, default=DemoSettings.fid_samples,
                   help="generated images per guidance scale for FID/KID")
    p.add_argument("--reference-samples", type=positive_int, default=DemoSettings.reference_samples,
                   help="held-out test images for FID/KID")
    p.add_argument("--cfg-scales", type=non_negative_float, nargs="+", default=list(DemoSettings.cfg_scales),
                   help="guidance scales to evaluate")
    p.add_argument("--grid-cfg-scale", type=non_negative_float, default=DemoSettings.grid_cfg_scale)
    p.add_argument("--sampler", choices=SAMPLERS, default=DemoSettings.sampler)
    p.add_argument("--num-steps", type=positive_int, default=DemoSettings.num_steps)
    p.add_argument("--seed", type=int, default=DemoSettings.seed)
    p.add_argument("train_overrides", nargs="*", metavar="section.field=value",
                   help="extra overrides for configs/fashion_mnist.yaml, e.g. model.name=DiT-T/4")
    args = parse_with_overrides(p, argv)  # overrides may stand before or after options
    settings = DemoSettings(out=args.out, extract_limit=args.extract_limit, train_minutes=args.train_minutes,
                            train_overrides=list(args.train_overrides), cfg_scales=tuple(args.cfg_scales),
                            grid_cfg_scale=args.grid_cfg_scale, fid_samples=args.fid_samples,
                            reference_samples=args.reference_samples, sampler=args.sampler,
                            num_steps=args.num_steps, seed=args.seed)
    Demo(settings).run(args.only)
    return 0


if __name__ == "__main__":
    run_main(main)

"""The main job end to end: images → KL-f8 VAE latents → DiT → guided samples → FID/KID, with a report folder.
By default on Fashion-MNIST (offline); ``--data FOLDER`` does the same on your own images.

    python tools/demo.py                       # everything, into demo_output/
    python tools/demo.py --only fid report     # rerun chosen stages (finished work is kept)
    python tools/demo.py --data my_images --out my_demo   # your images (one class per subfolder, or flat)

With ``--data FOLDER`` (one class per subfolder; a flat folder is one class, trained and sampled
unconditionally) a seeded part of every class is held out (``--held-out``), the rest encoded with the
folder default VAE and trained with configs/clipart.yaml's recipe; the samples and two floors are scored
against the held-out images (tools/demo_folder.py). Unreadable files are skipped and counted.

Each stage runs one of the project's tools in a subprocess (the very command a user would type),
so the report can list the exact command of every stage and any one of them can be rerun alone.
Every stage is resumable: extraction skips finished shards, training resumes from its last
checkpoint (``--resume auto``), many-sample runs keep finished chunks and feature statistics are
cached, so running the demo again after an interruption only does what is missing.

Output folder layout::

    <out>/split/                    (--data) training links, train.txt, held-out.txt, split.json
    <out>/latents/train/            shards + manifest.json (tools/extract.py)
    <out>/reference/test.npz        held-out images (Fashion-MNIST: its test images), ADM layout (arr_0)
    <out>/floors/                   (--data) real training images and their VAE reconstructions
    <out>/train/                    the training run (config.yaml, metrics.jsonl, checkpoints/, samples/)
    <out>/samples/cfg-<s>/          samples.npz per guidance scale (tools/sample_ddp.py)
    <out>/metrics/cfg-<s>.json      FID / KID / precision / recall (tools/fid.py); floor-*.json for the floors
    <out>/report/                   README.md, samples grid, loss curve, config.yaml, metrics.json
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from latentdit.cli import make_parser, non_negative_float, parse_with_overrides, positive_int, run_main
from latentdit.distributed import EXIT_USER_ERROR
from latentdit.data.split import parse_held_out
from latentdit.errors import LatentDiTError, ReportedError
from latentdit.io import atomic_path, check_output_folder, read_json
from latentdit.sampling import SAMPLERS

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the demo's helper modules beside it in tools/
import demo_folder  # noqa: E402
import demo_report  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]  # this file is tools/demo.py
DEMO_CONFIG = REPO_ROOT / "configs" / "fashion_mnist.yaml"
FOLDER_CONFIG = REPO_ROOT / "configs" / "clipart.yaml"   # the RGB recipe, the default for image folders
STAGES = ("split", "extract", "reference", "floors", "train", "grid", "samples", "fid", "report")
FOLDER_ONLY = ("split", "floors")
FOLDER_FID_SAMPLES = 300  # per scale: keeps a folder of a few thousand images within ~15 minutes on 2 CPU cores


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
    internal_scale: float = 2.0             # Internal Guidance weight where the recipe's model has an internal head
    seed: int = 0
    fid_batch_size: int = 50
    data_dir: Path | None = None            # where latents/ and reference/ live (default: out); lets runs share them
    data: Path | None = None                # an image folder instead of Fashion-MNIST
    held_out: float | int = 0.1             # --data: fraction (0 < x < 1) or count of each class held out
    detector: Path | None = None            # the Inception file, if not the installed one


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
        self._dataset = None

    # -- paths -------------------------------------------------------------------------------------
    @property
    def data_dir(self) -> Path:
        return Path(self.s.data_dir).expanduser().resolve() if self.s.data_dir else self.out

    @property
    def folder(self) -> Path | None:
        return Path(self.s.data).expanduser().resolve() if self.s.data else None

    @property
    def config_file(self) -> Path:
        return FOLDER_CONFIG if self.folder else DEMO_CONFIG

    def train_config(self):
        """The training stage's resolved config (the recipe with every override), checked as the training tool
        checks it."""
        from latentdit.config import load_config

        return load_config(self.config_file, self.train_overrides())

    @property
    def internal_scale(self) -> float:
        """The samples' Internal Guidance weight: the setting where the model has an internal head
        (``model.internal_block`` of the run's saved config once training has started, else of the recipe),
        else 1 (off)."""
        from latentdit.config import load_config

        saved = self.run_dir / "config.yaml"
        config = load_config(saved) if saved.is_file() else self.train_config()
        return self.s.internal_scale if config.model.internal_block is not None else 1.0

    def internal_flags(self) -> list[str]:
        """``--internal-scale W`` for the sampling tools where the samples take Internal Guidance, else nothing."""
        w = self.internal_scale
        return ["--internal-scale", f"{w:g}"] if w != 1.0 else []

    def sampler_flags(self) -> list[str]:
        """The sampler options of every sampling stage."""
        return ["--sampler", self.s.sampler, "--num-steps", str(self.s.num_steps), *self.internal_flags()]

    def sampler_text(self) -> str:
        """How the samples are drawn, for the report: ``heun-10``, with the Internal Guidance weight if any."""
        w = self.internal_scale
        return f"{self.s.sampler}-{self.s.num_steps}" + (f" with Internal Guidance w {w:g}" if w != 1.0 else "")

    @property
    def split_dir(self) -> Path:
        return self.data_dir / "split"

    def dataset(self):
        """The user's folder (listing only, nothing decoded)."""
        if self._dataset is None:
            self._dataset = demo_folder.open_folder(self.folder, self.s.image_size)
        return self._dataset

    @property
    def flat(self) -> bool:
        return bool(self.folder) and demo_folder.is_flat(self.dataset())

    def vae_spec(self) -> str:
        from latentdit.vae import default_vae_for

        manifest = self.latents_dir / "manifest.json"
        if manifest.is_file():
            return read_json(manifest, "manifest")["vae"]["spec"]
        return default_vae_for(self.folder or "fashion-mnist")

    def stages(self) -> tuple[str, ...]:
        return STAGES if self.folder else tuple(s for s in STAGES if s not in FOLDER_ONLY)

    def rerun(self, stage: str) -> str:
        """The demo command that reruns one in-process stage."""
        cmd = [sys.executable, _tool("demo.py"), "--out", str(self.out)]
        if self.folder:
            cmd += ["--data", str(self.folder), "--held-out", f"{self.s.held_out:g}", "--seed", str(self.s.seed)]
        return _display(cmd + ["--only", stage])

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

    @contextmanager
    def _in_process(self, name: str):
        """A stage run in this process, logged and timed like the others; the demo command reruns it alone."""
        shown = self.rerun(name)
        self.log(f"\n=== [{name}] {shown}")
        start = time.perf_counter()
        yield
        self.results.append(StageResult(name, shown, time.perf_counter() - start))
        self.log(f"=== [{name}] done in {self.results[-1].seconds:.1f} s")

    def checkpoint(self) -> Path:
        """The EMA weights of the run's latest checkpoint."""
        ckpts = sorted((self.run_dir / "checkpoints").glob("step-*"))
        if not ckpts:
            raise LatentDiTError(f"no checkpoint in {self.run_dir / 'checkpoints'}; run the 'train' stage first")
        return ckpts[-1] / "ema.safetensors"

    # -- stages ------------------------------------------------------------------------------------
    def stage_split(self) -> None:
        with self._in_process("split"):
            record = demo_folder.write_split(self.dataset(), self.split_dir, self.s.held_out, self.s.seed)
            self.log(f"{record['num_train']} training and {record['num_held_out']} held-out images "
                     f"({len(record['class_names'])} class(es)); lists in {self.split_dir}")

    def stage_extract(self) -> None:
        if self.folder:  # the training part only, as configs/clipart.yaml's recipe wants it
            cmd = [sys.executable, _tool("extract.py"), "--data",
                   str(demo_folder.training_folder(self.split_dir, self.dataset())),
                   "--image-size", str(self.s.image_size), "--latent-norm", "per-channel", "--out", str(self.latents_dir)]
        else:
            cmd = [sys.executable, _tool("extract.py"), "--data", "fashion-mnist", "--split", "train",
                   "--image-size", str(self.s.image_size), "--out", str(self.latents_dir)]
        if self.s.extract_limit and not self.folder:
            cmd += ["--limit", str(self.s.extract_limit)]
        if not self.s.flip:
            cmd.append("--no-flip")
        self._run("extract", cmd)

    def stage_reference(self) -> None:
        """Held-out images as an ADM-style npz: a folder's held-out part, or the first N of Fashion-MNIST's
        balanced t10k split."""
        from latentdit.data.fashion_mnist import FashionMNIST

        with self._in_process("reference"):
            if self.folder:
                record = demo_folder.write_reference(Path(self.dataset().root), self.split_dir, self.reference_npz,
                                                     self.s.image_size)
                self.log(f"{record['num_images']} held-out images, {len(record['skipped'])} unreadable ones skipped")
                return
            dataset = FashionMNIST(split="test", image_size=self.s.image_size)
            images = np.stack([dataset.image_uint8(i) for i in range(min(self.s.reference_samples, len(dataset)))])
            if images.ndim == 3:  # grey → RGB, as the VAE and the samples see them
                images = np.repeat(images[..., None], 3, axis=-1)
            with atomic_path(self.reference_npz) as tmp, open(tmp, "wb") as f:
                np.savez(f, arr_0=images)

    def stage_floors(self) -> None:
        """Real training images and the VAE's reconstructions of the same images (see tools/demo_folder.py)."""
        with self._in_process("floors"):
            demo_folder.write_floors(Path(self.dataset().root), self.split_dir, self.out / "floors",
                                     self.s.image_size, self.s.fid_samples, self.s.seed, self.vae_spec(), self.log)

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
        cmd = _accelerate_launch() + [_tool("train.py"), "--config", str(self.config_file), "--resume", "auto",
                                      *self.train_overrides()]
        self._run("train", cmd)
        self.train_done_marker.write_text(f"{self.checkpoint()}\n")

    def train_overrides(self) -> list[str]:
        """The config overrides of the training stage: the demo's own, then the user's."""
        own = [f"data.latents={self.latents_dir}", f"train.run_dir={self.run_dir}",
               f"train.max_minutes={self.s.train_minutes:g}", f"data.flip={str(self.s.flip).lower()}",
               f"train.seed={self.s.seed}"]
        return own + self.folder_overrides() + list(self.s.train_overrides)

    def folder_overrides(self) -> list[str]:
        """What training on an image folder changes in its recipe (nothing for Fashion-MNIST)."""
        own = []
        if self.folder:  # the recipe keeps every checkpoint; the demo needs its last one only
            own.append("train.keep_last=2")
        if self.flat:  # one class: nothing for a label (or its dropout) to carry, so no null class either
            own.append("model.class_dropout_prob=0")
        return own

    def stage_grid(self) -> None:
        cmd = [sys.executable, _tool("sample.py"), "--ckpt", str(self.checkpoint()),
               "--samples-per-label", str(self.s.samples_per_class),
               "--cfg-scale", f"{self.s.grid_cfg_scale:g}", *self.sampler_flags(), "--seed", str(self.s.seed),
               *(["--labels", "0,0,0,0"] if self.flat else []),
               "--out", str(self.report_dir / "samples.png"),
               "--trajectory", str(self.report_dir / "trajectory.png")]
        self._run("grid", cmd)

    @property
    def label_mode(self) -> str:
        """How the FID samples' labels are drawn: a folder's classes in their training proportions (the
        held-out reference has them too), Fashion-MNIST's balanced classes evenly."""
        return "training" if self.folder else "balanced"

    def stage_samples(self) -> None:
        for scale in self.s.cfg_scales:
            cmd = [sys.executable, _tool("sample_ddp.py"), "--ckpt", str(self.checkpoint()),
                   "--num-samples", str(self.s.fid_samples), "--cfg-scale", f"{scale:g}",
                   *(["--labels", self.label_mode] if self.label_mode != "balanced" else []),
                   *self.sampler_flags(), "--seed", str(self.s.seed), "--out-dir", str(self.samples_dir(scale))]
            self._run(f"samples cfg {scale:g}", cmd)

    def floor_json(self, name: str) -> Path:
        return self.out / "metrics" / f"floor-{name.split()[0].lower()}.json"

    def stage_fid(self) -> None:
        scored = [(f"fid cfg {scale:g}", self.samples_dir(scale) / "samples.npz", self.metrics_json(scale))
                  for scale in self.s.cfg_scales]
        if self.folder:
            scored += [(f"fid floor {name}", path, self.floor_json(name))
                       for name, path in demo_folder.floor_paths(self.out / "floors").items()]
        for name, npz, json_path in scored:
            cmd = [sys.executable, _tool("fid.py"), str(self.reference_npz), str(npz),
                   "--batch-size", str(self.s.fid_batch_size), "--json", str(json_path)]
            if self.s.detector:
                cmd += ["--detector", str(self.s.detector)]
            self._run(name, cmd)

    def stage_report(self) -> Path:
        path = demo_report.write_report(self)
        self.log(f"\nreport: {path}")
        return path

    def run(self, only: Sequence[str] | None = None) -> Path | None:
        stages = list(only) if only else list(self.stages())
        self.check(stages)
        self.out.mkdir(parents=True, exist_ok=True)
        total = time.perf_counter()
        report = None
        for name in self.stages():
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
        unknown = [s for s in stages if s not in STAGES]
        if unknown:
            raise LatentDiTError(f"unknown demo stage(s) {unknown}; valid stages: {', '.join(STAGES)}")
        check_output_folder(self.out, "--out")
        cfg = self.train_config()
        demo_folder.check_folder(self, stages, FOLDER_ONLY, cfg.train.global_batch_size)
        if {"grid", "samples"} & set(stages):  # the sampler settings, against the process trained with
            from latentdit.diffusion import build_process
            from latentdit.sampling import SamplerSettings

            process = build_process(cfg.diffusion)
            for scale in (self.s.grid_cfg_scale, *self.s.cfg_scales):
                # the demo guides every latent channel, so their number plays no part here
                SamplerSettings(sampler=self.s.sampler, num_steps=self.s.num_steps, cfg_scale=scale,
                                internal_scale=self.internal_scale).resolved(
                    process, in_channels=cfg.model.in_channels or 1, internal_head=cfg.model.internal_block is not None)
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
            if self.folder and "floors" not in stages:
                needed += list(demo_folder.floor_paths(self.out / "floors").values())
            missing = [p for p in needed if not p.is_file()]
            if missing:
                stage = ("reference" if missing[0] == self.reference_npz else
                         "floors" if "floors" in missing[0].parts else "samples")
                raise LatentDiTError(f"nothing to evaluate: {missing[0]} does not exist; run the '{stage}' stage "
                                     "first (or the whole demo)")


def main(argv=None) -> int:
    p = make_parser(__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("demo_output"), help="output folder (the report is in OUT/report)")
    p.add_argument("--data", type=Path, default=None, metavar="FOLDER",
                   help="your image folder (one class per subfolder, or flat = one class) instead of Fashion-MNIST")
    p.add_argument("--held-out", default="0.1", metavar="X",
                   help="--data: images held out of each class for FID/KID, a fraction (0 < X < 1) or a count")
    p.add_argument("--only", nargs="+", choices=STAGES, metavar="STAGE",
                   help=f"run only these stages: {', '.join(STAGES)} (split and floors: --data only)")
    p.add_argument("--train-minutes", type=non_negative_float, default=DemoSettings.train_minutes,
                   help="training time budget in minutes")
    p.add_argument("--extract-limit", type=positive_int, default=DemoSettings.extract_limit,
                   help="encode only the first N of the 60,000 training images")
    p.add_argument("--fid-samples", type=positive_int, default=None,
                   help=f"generated images per guidance scale for FID/KID (default {DemoSettings.fid_samples}; "
                        f"--data: {FOLDER_FID_SAMPLES}, and as many real images for each floor)")
    p.add_argument("--reference-samples", type=positive_int, default=DemoSettings.reference_samples,
                   help="Fashion-MNIST: held-out test images for FID/KID")
    p.add_argument("--cfg-scales", type=non_negative_float, nargs="+", default=None,
                   help=f"guidance scales to evaluate (default {' '.join(map(_fmt_scale, DemoSettings.cfg_scales))}; "
                        "a flat folder: 1)")
    p.add_argument("--grid-cfg-scale", type=non_negative_float, default=None,
                   help=f"guidance scale of the grid (default {DemoSettings.grid_cfg_scale:g}; a flat folder: 1)")
    p.add_argument("--detector", type=Path, default=None, metavar="PATH",
                   help="the Inception TorchScript file, if not the installed one (passed to tools/fid.py)")
    p.add_argument("--sampler", choices=SAMPLERS, default=DemoSettings.sampler)
    p.add_argument("--num-steps", type=positive_int, default=DemoSettings.num_steps)
    p.add_argument("--internal-scale", type=non_negative_float, default=DemoSettings.internal_scale, metavar="W",
                   help="Internal Guidance weight of the grid and the samples where the recipe's model has an "
                        "internal head (model.internal_block, as configs/fashion_mnist.yaml has); 1 = off")
    p.add_argument("--seed", type=int, default=DemoSettings.seed)
    p.add_argument("train_overrides", nargs="*", metavar="section.field=value",
                   help="extra overrides for configs/fashion_mnist.yaml (--data: configs/clipart.yaml), "
                        "e.g. model.name=DiT-T/4")
    args = parse_with_overrides(p, argv)  # overrides may stand before or after options

    flat = args.data is not None and demo_folder.is_flat(demo_folder.open_folder(args.data, DemoSettings.image_size))
    default_scales, default_grid = ((1.0,), 1.0) if flat else (DemoSettings.cfg_scales, DemoSettings.grid_cfg_scale)
    settings = DemoSettings(
        out=args.out, extract_limit=args.extract_limit, train_minutes=args.train_minutes,
        train_overrides=list(args.train_overrides),
        cfg_scales=tuple(args.cfg_scales) if args.cfg_scales else default_scales,
        grid_cfg_scale=default_grid if args.grid_cfg_scale is None else args.grid_cfg_scale,
        fid_samples=args.fid_samples or (FOLDER_FID_SAMPLES if args.data else DemoSettings.fid_samples),
        reference_samples=args.reference_samples, sampler=args.sampler, num_steps=args.num_steps,
        internal_scale=args.internal_scale, seed=args.seed,
        data=args.data, held_out=parse_held_out(args.held_out), detector=args.detector)
    Demo(settings).run(args.only)
    return 0


if __name__ == "__main__":
    run_main(main)

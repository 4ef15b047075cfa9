"""Quality per compute: DiT training recipes side by side at the same wall-clock budget.

Every recipe trains the same model (DiT-T/2) from scratch on the same Fashion-MNIST latents (the demo's
extraction) for the same number of minutes, then draws the same balanced labels and seeds with its
own sampler and with a fast one (≤ 20 steps), and is scored by FID and KID against the same held-out
test images. Two floors are measured with the same protocol in the same run: real held-out training
images (what a perfect generator scores) and the VAE's reconstructions of those images (what a perfect
DiT can score with this VAE), so each row says how much of its distance is the DiT's.

    python benchmarks/bench_recipes.py                              # the default rows, 5 min each
    python benchmarks/bench_recipes.py --minutes 15 --recipes eps flow best
    python benchmarks/bench_recipes.py --recipes best best+adamw best+constant-lr+no-internal+lr2e-3
    python benchmarks/bench_recipes.py --repeats 2                  # run the list twice, interleaved
    python benchmarks/bench_recipes.py --steps 2500 --repeats 2     # a fixed number of steps instead
    # an image folder, with the protocol of `tools/demo.py --data` (its split, floors, configs/clipart.yaml,
    # labels in the training proportions): the rows built on the demo's recipe (best, best+...)
    python benchmarks/bench_recipes.py --data /usr/share/openclipart/png --out bench_clipart --fid-samples 300 \
        --cfg-scale 3 --recipes best best+internal

A row is a base recipe with options on top, ``BASE+OPTION+OPTION…``: each option's config overrides are
applied on top of the base, and no two options of a row may set the same field (``--help`` lists bases and
options). A row whose model has an internal head (``model.internal_block``) is scored plain and with Internal
Guidance at the demo's weight (2).

With ``--minutes`` every recipe gets the same wall-clock budget (quality per compute, the machine's speed
included); with ``--steps`` the same number of steps (quality per step, independent of the machine's load),
and the images/s column is measured from the run log, to be read apart.

Runs go round-robin over the recipes (A B C A B C with --repeats 2), so a change in the machine's load
falls on all of them; the table prints the spread of the repeats. Everything is resumable: rerunning
the command skips finished training runs, sample files and cached features. A finished run is known by
its row's name; before one is reused or continued, its saved config is compared with the one its row
resolves to now, and a difference (a changed config file, recipe or --minutes) is refused, naming the
fields: use a new --out for the new meaning.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from latentdit.cli import make_parser, non_negative_float, positive_int, run_main
from latentdit.config import load_config
from latentdit.engine.checkpoint import config_differences
from latentdit.errors import LatentDiTError
from latentdit.io import atomic_path, read_json, write_json

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import demo_folder  # noqa: E402  (tools/demo_folder.py)
from demo import DEMO_CONFIG, FOLDER_CONFIG, REPO_ROOT, Demo, DemoSettings, _accelerate_launch, _tool  # noqa: E402

EPS = "configs/fashion_mnist_eps.yaml"
FLOW = ("diffusion.process=flow", "model.learn_sigma=false")
LOGNORM = FLOW + ("diffusion.time_sampling=logit_normal",)


@dataclass(frozen=True)
class Recipe:
    """One training recipe: a config plus overrides, and the samplers it is scored with
    (``(sampler, steps)``; the first is the recipe's own, the rest are the ≤ 20-step ones). A recipe whose
    model has an internal head is scored plain and with Internal Guidance (:data:`INTERNAL_VARIANTS`)."""

    name: str
    config: str
    overrides: tuple[str, ...]
    samplers: tuple[tuple[str, int], ...]
    what: str


@dataclass(frozen=True)
class Option:
    """Overrides that a row puts on top of its base recipe: ``BASE+OPTION+OPTION…``, applied in that order."""

    overrides: tuple[str, ...]
    what: str


DDPM_SAMPLERS = (("ddim", 50), ("dpm-solver", 20))
FLOW_SAMPLERS = (("euler", 50), ("heun", 10))
# guidance variants of a model with an internal head: (tag, extra sample_ddp.py flags); "" is the cfg scale alone
_IG = f"{DemoSettings.internal_scale:g}"  # the demo's Internal Guidance weight
INTERNAL_VARIANTS = (("", ()), (f"ig{_IG}", ("--internal-scale", _IG)))

BASES = {r.name: r for r in (
    Recipe("dit-official", "configs/fashion_mnist_dit_baseline.yaml", (), (("ddpm", 250), ("dpm-solver", 20)),
           "the official DiT recipe verbatim (eps + learned sigma, lr 1e-4, batch 256, EMA 0.9999)"),
    Recipe("eps", EPS, (), DDPM_SAMPLERS, "eps + learned sigma with the CPU-tuned optimiser and EMA warm-up"),
    Recipe("flow", EPS, FLOW, FLOW_SAMPLERS, "rectified flow, v-prediction, uniform t"),
    Recipe("flow-lognorm", EPS, LOGNORM, FLOW_SAMPLERS, "flow + logit-normal(0, 1) t"),
    Recipe("flow-x", EPS, FLOW + ("diffusion.prediction=x",), FLOW_SAMPLERS,
           "flow + x-prediction with the velocity loss"),
    Recipe("flow-shift", EPS, FLOW + ("diffusion.time_shift=2.0",), FLOW_SAMPLERS,
           "flow + time shift 2 (more training time near noise)"),
    Recipe("best", "configs/fashion_mnist.yaml", (), FLOW_SAMPLERS, "the demo's recipe (configs/fashion_mnist.yaml)"),
)}

OPTIONS = {
    # the model options (LightningDiT adds them to a rectified flow: measured on top of flow-lognorm)
    "rmsnorm": Option(("model.norm=rmsnorm",), "RMSNorm"),
    "swiglu": Option(("model.mlp=swiglu",), "SwiGLU MLP"),
    "rope": Option(("model.pos=rope2d",), "2-D RoPE on q/k"),
    "qknorm": Option(("model.qk_norm=true",), "qk-norm"),
    # encoder-free accelerants (DiT-T/2 has 4 blocks, 0-based)
    "layersync": Option(("train.layersync_weight=0.2", "train.layersync_blocks=[0,2]"),
                        "LayerSync: block 0 toward stop-grad block 2, λ 0.2"),
    "dispersive": Option(("train.dispersive_weight=0.25", "train.dispersive_block=0", "train.dispersive_tau=0.5"),
                         "dispersive loss on block 0, τ 0.5, λ 0.25"),
    "internal": Option(("model.internal_block=1",), "an internal head after block 1 of 4 (λ 0.5), sampled plain "
                                                    "and with Internal Guidance w 2 before the cfg scale"),
    "no-internal": Option(("model.internal_block=null",), "no internal head"),
    # the schedule and the EMA
    "wsd": Option(("train.lr_schedule=wsd", "train.decay_fraction=0.4"),
                  "warmup-stable-decay: linear to 0 over the last 40 % of the budget"),
    "constant-lr": Option(("train.lr_schedule=constant",), "constant learning rate after the warm-up"),
    "power-ema": Option(("train.ema_sigma_rel=0.1", "train.ema_warmup=false", "train.ema_decay=0.9999"),
                        "EDM2 power-function EMA, σ_rel 0.1"),
    "ema0.9995": Option(("train.ema_decay=0.9995",), "EMA decay 0.9995 (twice the averaging length)"),
    # the model size, batch and learning rate for the budget (DiT-T/2: depth 4, width 128, 4 heads, batch 64,
    # lr 1e-3; a smaller model takes more steps in the same minutes, a larger one learns more per step)
    "depth2": Option(("model.depth=2",), "depth 2 (half the compute per step)"),
    "depth6": Option(("model.depth=6",), "depth 6 (1.5x the compute per step)"),
    "width192": Option(("model.hidden_size=192", "model.num_heads=6"), "width 192, 6 heads (about 2x the compute)"),
    "patch1": Option(("model.patch_size=1", "model.hidden_size=64", "model.num_heads=2"),
                     "patch 1 (64 tokens of one latent pixel), width 64, 2 heads (about 1.2x the time per step)"),
    "batch128": Option(("train.global_batch_size=128",), "batch 128 (half the steps)"),
    "batch32": Option(("train.global_batch_size=32",), "batch 32 (twice the steps)"),
    "batch16": Option(("train.global_batch_size=16",), "batch 16 (four times the steps)"),
    "lr1e-3": Option(("train.lr=1e-3",), "lr 1e-3"),
    "lr2e-3": Option(("train.lr=2e-3",), "lr 2e-3"),
    "beta2-0.99": Option(("train.betas=[0.9,0.99]",), "Adam β₂ 0.99 (a 100-step second-moment memory)"),
    # where the training times fall: logit-normal centred on t = 0.5 (the recipe) or nearer the data
    "logit-mean-0.5": Option(("diffusion.logit_mean=-0.5",), "logit-normal times centred on t ≈ 0.38"),
    "dropout0.2": Option(("model.class_dropout_prob=0.2",), "label dropout 0.2"),
    # the optimizer (at the recipe's learning rate: the Fashion-MNIST recipe's 1e-3, the folder recipe's 2e-3)
    "adamw": Option(("train.optimizer=adamw",), "AdamW"),
    "muon": Option(("train.optimizer=muon",), "Muon for the blocks' attention and MLP matrices, AdamW for the rest"),
}

# the rows run when --recipes is not given: the recipes, the model options on the flow recipe they were
# designed for, and the demo's recipe with each of its alternatives
DEFAULT_ROWS = (*BASES, *(f"flow-lognorm+{o}" for o in ("rmsnorm", "swiglu", "rope", "qknorm")),
                *(f"best+{o}" for o in ("constant-lr", "no-internal", "adamw", "layersync", "dispersive",
                                        "power-ema", "no-internal+depth2", "depth6", "width192", "patch1",
                                        "batch32", "lr2e-3")))


def _field(override: str) -> str:
    return override.split("=", 1)[0]


def recipe(name: str) -> Recipe:
    """The row ``BASE[+OPTION...]``: the base recipe with each option's overrides on top (no two options of a
    row may set the same field, so their order does not matter)."""
    base, *options = name.split("+")
    unknown = [o for o in options if o not in OPTIONS]
    if base not in BASES or unknown or len(set(options)) != len(options):
        raise LatentDiTError(
            f"--recipes: {name!r} is not BASE[+OPTION...] with BASE one of {', '.join(BASES)} and distinct "
            f"OPTIONs from {', '.join(OPTIONS)}")
    owner: dict[str, str] = {}
    for o in options:
        for field in map(_field, OPTIONS[o].overrides):
            if field in owner:
                raise LatentDiTError(f"--recipes: {name!r}: options {owner[field]} and {o} both set {field}; "
                                     "keep one of them")
            owner[field] = o
    b = BASES[base]
    return Recipe(name, b.config, b.overrides + tuple(v for o in options for v in OPTIONS[o].overrides),
                  b.samplers, "; ".join([b.what, *(OPTIONS[o].what for o in options)]))


# the config fields a run gets from where --out is, not from its row
PATHS_UNDER_OUT = {("data", "latents"), ("train", "run_dir")}


def _metrics_line(m: dict) -> str:
    return f"{m['fid']:>8.1f} {m['kid_mean'] * 1000:>7.1f} ± {m['kid_std'] * 1000:<5.1f}"


class Bench:
    """The benchmark's folder and stages (all built on the demo's stages and tools)."""

    def __init__(self, args) -> None:
        self.args = args
        self.out: Path = args.out
        self.shared = dict(data_dir=self.out / "data", fid_samples=args.fid_samples,
                           reference_samples=args.reference_samples, extract_limit=args.extract_limit,
                           cfg_scales=(args.cfg_scale,), seed=args.seed, data=args.data)
        self.data = Demo(DemoSettings(out=self.out / "data", **self.shared))

    @property
    def on_folder(self) -> bool:
        return self.data.folder is not None

    def config(self, recipe: Recipe) -> Path:
        """The recipe's config; on an image folder the demo's recipe becomes the folder recipe."""
        path = REPO_ROOT / recipe.config
        if not self.on_folder:
            return path
        if path != DEMO_CONFIG:
            raise LatentDiTError(f"--data: recipe {recipe.name} is not built on the demo's recipe; on an image "
                                 "folder only best and best+... apply (they train configs/clipart.yaml)")
        return FOLDER_CONFIG

    def variants(self, recipe: Recipe) -> tuple[tuple[str, tuple[str, ...]], ...]:
        """The guidance variants a row is scored with: also Internal Guidance where its model has an internal head."""
        try:
            config = load_config(self.config(recipe), list(recipe.overrides))
        except LatentDiTError as e:
            raise LatentDiTError(f"--recipes {recipe.name}: {e}") from None
        return INTERNAL_VARIANTS if config.model.internal_block is not None else (("", ()),)

    def prepare(self) -> None:
        self.data.run(["split", "extract", "reference", "floors"] if self.on_folder else ["extract", "reference"])

    def _score(self, npz: Path, json_path: Path) -> dict:
        if not json_path.exists():
            self.data._run(f"fid {npz.parent.name}", [sys.executable, _tool("fid.py"), str(self.data.reference_npz),
                                                      str(npz), "--no-pr", "--json", str(json_path)])
        return read_json(json_path, "metrics file")

    # -- floors ------------------------------------------------------------------------------------
    def floors(self) -> dict[str, dict]:
        """Real held-out training images (never extracted: taken from the end of the split) and the
        VAE's reconstructions of the same images, scored like the samples; on an image folder the demo's
        floors (a seeded draw of training images and their reconstructions)."""
        if self.on_folder:
            return {name: self._score(path, path.parent / "metrics.json")
                    for name, path in demo_folder.floor_paths(self.data.out / "floors").items()}
        from latentdit.vae import VAE
        from latentdit.data.fashion_mnist import FashionMNIST

        folder = self.out / "floors"
        real, recon = folder / "real" / "samples.npz", folder / "reconstructions" / "samples.npz"
        if not recon.exists():
            dataset = FashionMNIST(split="train", image_size=DemoSettings.image_size)
            n = self.args.fid_samples
            first = len(dataset) - n
            if self.args.extract_limit and first < self.args.extract_limit:
                raise LatentDiTError(f"--fid-samples {n}: the held-out floor images would overlap the "
                                     f"{self.args.extract_limit} extracted training images")
            grey = np.stack([dataset.image_uint8(i) for i in range(first, len(dataset))])
            images = np.repeat(grey[..., None], 3, axis=-1) if grey.ndim == 3 else grey
            vae = VAE.load(read_json(self.data.latents_dir / "manifest.json", "manifest")["vae"]["spec"])
            x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
            rec = vae.reconstruct(x)
            rec_u8 = ((rec + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
            for path, arr in ((real, images), (recon, rec_u8)):
                path.parent.mkdir(parents=True, exist_ok=True)
                with atomic_path(path) as tmp, open(tmp, "wb") as f:
                    np.savez(f, arr_0=arr)
        return {name: self._score(path, path.parent / "metrics.json")
                for name, path in (("real images", real), ("VAE reconstructions", recon))}

    # -- one recipe ---------------------------------------------------------------------------------
    def run_dir(self, recipe: Recipe, repeat: int) -> Path:
        runs = f"runs-{self.args.steps}steps" if self.args.steps else "runs"  # a budget's runs never mix
        return self.out / runs / f"{recipe.name}-r{repeat}"

    def overrides(self, recipe: Recipe, repeat: int) -> list[str]:
        """The command-line overrides of one run's training (its budget, data, seed and the recipe's own)."""
        budget = ([f"train.max_steps={self.args.steps}", "train.max_minutes=0"] if self.args.steps
                  else [f"train.max_minutes={self.args.minutes:g}"])
        return [f"data.latents={self.data.latents_dir}", f"train.run_dir={self.run_dir(recipe, repeat)}", *budget,
                "data.flip=false", f"train.seed={self.args.seed + repeat}", "train.sample_every=0",
                *self.data.folder_overrides(), *recipe.overrides]

    def check_run(self, recipe: Recipe, repeat: int) -> None:
        """A run already in --out (finished or not) must have been started from the config its row resolves
        to now: after a change to a recipe's config file, its overrides or --minutes, the old run would
        be continued or reported under the row's new meaning. (The paths under --out may differ: a moved
        --out is the same benchmark.)"""
        saved = self.run_dir(recipe, repeat) / "config.yaml"
        if not saved.exists():
            return
        old = load_config(saved).to_dict()
        new = load_config(self.config(recipe), self.overrides(recipe, repeat)).to_dict()
        changed = config_differences(old, new, PATHS_UNDER_OUT)
        if changed:
            pairs = (key.split(".") for key in changed)
            what = ", ".join(f"{a}.{b} {old[a][b]!r} → {new[a][b]!r}" for a, b in pairs)
            raise LatentDiTError(f"{saved}: run {saved.parent.name} was started with another config than row "
                                 f"{recipe.name} gives now ({what}); pass another --out or remove the run")

    def train(self, recipe: Recipe, repeat: int) -> dict:
        run = self.run_dir(recipe, repeat)
        done = run / "bench-train-finished"
        if not done.exists():
            cmd = _accelerate_launch() + [_tool("train.py"), "--config", str(self.config(recipe)), "--resume", "auto",
                                          *self.overrides(recipe, repeat)]
            self.data._run(f"train {recipe.name} (repeat {repeat})", cmd)
            done.write_text("finished\n")
        state = read_json(self.checkpoint(recipe, repeat).parent / "state.json", "checkpoint state")
        steps = int(state["step"])
        # the run log's last row: training seconds so far (the budget's clock, resumes included)
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
        seconds = float(rows[-1]["elapsed_s"]) if rows and "elapsed_s" in rows[-1] else self.args.minutes * 60
        return {"steps": steps, "img_per_sec": steps * int(state["global_batch_size"]) / max(seconds, 1e-9)}

    def checkpoint(self, recipe: Recipe, repeat: int) -> Path:
        ckpts = sorted((self.run_dir(recipe, repeat) / "checkpoints").glob("step-*"))
        if not ckpts:
            raise LatentDiTError(f"no checkpoint in {self.run_dir(recipe, repeat)}")
        return ckpts[-1] / "ema.safetensors"

    def eval_dir(self, recipe: Recipe, repeat: int, sampler: str, steps: int, tag: str = "") -> Path:
        return self.run_dir(recipe, repeat) / "eval" / _eval_name(sampler, steps, tag)

    def finished(self, recipe: Recipe, repeat: int) -> bool:
        return (self.run_dir(recipe, repeat) / "bench-train-finished").exists()

    def scored(self, recipe: Recipe, repeat: int, sampler: str, steps: int, tag: str = "") -> bool:
        return (self.eval_dir(recipe, repeat, sampler, steps, tag) / "metrics.json").exists()

    def sample_and_score(self, recipe: Recipe, repeat: int, sampler: str, steps: int, tag: str = "",
                         flags: tuple[str, ...] = ()) -> dict:
        folder = self.eval_dir(recipe, repeat, sampler, steps, tag)
        npz = folder / "samples.npz"
        if not npz.exists():
            self.data._run(f"samples {recipe.name} {folder.name}", [
                sys.executable, _tool("sample_ddp.py"), "--ckpt", str(self.checkpoint(recipe, repeat)),
                "--num-samples", str(self.args.fid_samples), "--cfg-scale", f"{self.args.cfg_scale:g}",
                "--sampler", sampler, "--num-steps", str(steps), "--seed", str(self.args.seed),
                "--labels", self.data.label_mode, "--out-dir", str(folder), *flags])
        return self._score(npz, folder / "metrics.json")


def _eval_name(sampler: str, steps: int, tag: str = "") -> str:
    return f"{sampler}-{steps}" + (f"-{tag}" if tag else "")


def main(argv=None) -> int:
    p = make_parser(__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("bench_recipes"))
    p.add_argument("--minutes", type=non_negative_float, default=5.0, help="training budget of every recipe")
    p.add_argument("--steps", type=positive_int, default=None,
                   help="train every recipe for this many steps instead of --minutes (quality per step)")
    p.add_argument("--recipes", nargs="+", default=list(DEFAULT_ROWS), metavar="BASE[+OPTION...]",
                   help=f"the rows, run in this order: a base recipe ({', '.join(BASES)}) with options on top "
                        f"({', '.join(OPTIONS)})")
    p.add_argument("--repeats", type=positive_int, default=1, help="train each recipe this many times, interleaved")
    p.add_argument("--data", type=Path, default=None,
                   help="an image folder instead of Fashion-MNIST, split and scored as tools/demo.py --data does")
    p.add_argument("--fid-samples", type=positive_int, default=1000,
                   help="samples per evaluation (balanced labels; on --data in the training proportions)")
    p.add_argument("--reference-samples", type=positive_int, default=DemoSettings.reference_samples,
                   help="held-out test images (the reference set; on --data all held-out images)")
    p.add_argument("--extract-limit", type=positive_int, default=DemoSettings.extract_limit)
    p.add_argument("--cfg-scale", type=non_negative_float, default=1.5)
    p.add_argument("--fast-only", action="store_true", help="score only the ≤ 20-step samplers (saves Inception time)")
    p.add_argument("--table-only", action="store_true",
                   help="run nothing new: print the table of what earlier runs in --out have finished")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.minutes <= 0:
        raise LatentDiTError("--minutes must be > 0: the recipes are compared at a fixed training budget")

    recipes = [recipe(name) for name in dict.fromkeys(args.recipes)]  # as given
    bench = Bench(args)
    variants = {r.name: bench.variants(r) for r in recipes}  # an unusable row is refused before anything runs
    for row in recipes:
        for repeat in range(args.repeats):
            bench.check_run(row, repeat)
    started = time.time()
    bench.prepare()
    floors = bench.floors()
    results: dict[tuple[str, int], dict] = {}
    for repeat in range(args.repeats):
        for row in recipes:
            if args.table_only and not bench.finished(row, repeat):
                continue
            train = bench.train(row, repeat)
            samplers = row.samplers[1:] if args.fast_only else row.samplers
            scores = {_eval_name(s, n, tag): bench.sample_and_score(row, repeat, s, n, tag, flags)
                      for s, n in samplers for tag, flags in variants[row.name]
                      if not args.table_only or bench.scored(row, repeat, s, n, tag)}
            results[(row.name, repeat)] = {"train": train, "scores": scores}

    recon_kid = floors["VAE reconstructions"]["kid_mean"]
    budget = f"{args.steps} steps" if args.steps else f"{args.minutes:g} min"
    if bench.on_folder:
        data = f"{args.data}, {FOLDER_CONFIG.name}"
        protocol = f"labels in the training proportions, cfg {args.cfg_scale:g}) vs the folder's held-out images"
    else:
        data = f"Fashion-MNIST 64², {args.extract_limit} training latents"
        protocol = f"balanced labels, cfg {args.cfg_scale:g}) vs {args.reference_samples} held-out test images"
    header = (f"\nrecipes at {budget} of training each ({data}); {args.fid_samples} samples per row ({protocol}; "
              f"machine: {platform.machine()}, {torch.get_num_threads()} threads")
    print(header)
    for row in recipes:
        print(f"  {row.name}: {row.what}")
    width = max(28, *(len(r.name) + 4 for r in recipes))
    print(f"{'row':<{width}} {'sampler':<14} {'steps':>6} {'img/s':>7} {'FID':>8} {'KID x1000':>15} {'excess':>7}")
    for name, m in floors.items():
        print(f"{'floor: ' + name:<{width}} {'-':<14} {'-':>6} {'-':>7} {_metrics_line(m)} {'':>7}")
    table = []
    for (name, repeat), r in results.items():
        for sampler, m in r["scores"].items():
            excess = (m["kid_mean"] - recon_kid) * 1000
            label = name if args.repeats == 1 else f"{name} #{repeat}"
            print(f"{label:<{width}} {sampler:<14} {r['train']['steps']:>6d} {r['train']['img_per_sec']:>7.0f} "
                  f"{_metrics_line(m)} {excess:>7.1f}")
            table.append({"recipe": name, "repeat": repeat, "sampler": sampler, **r["train"],
                          "fid": m["fid"], "kid_mean": m["kid_mean"], "kid_std": m["kid_std"], "excess_kid": excess})
    if args.repeats > 1:
        print("\nspread over repeats (KID x1000 min–max per recipe and sampler):")
        for row in recipes:
            for name in (_eval_name(s, n, tag) for s, n in row.samplers for tag, _ in variants[row.name]):
                kids = [line["kid_mean"] * 1000 for line in table
                        if line["recipe"] == row.name and line["sampler"] == name]
                if kids:
                    print(f"  {row.name:<{width - 2}} {name:<14} {min(kids):.1f}–{max(kids):.1f}  "
                          f"(mean {sum(kids) / len(kids):.1f})")
    print("excess = KID x1000 above the VAE-reconstruction floor (the DiT's share of the distance)")
    print(f"total wall time {(time.time() - started) / 60:.1f} min")
    write_json(args.out / "results.json", {"floors": floors, "rows": table, "settings": {
        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}})
    return 0


if __name__ == "__main__":
    run_main(main)

"""The demo's report (README.md of the report folder): pictures, the metrics with their protocol, the split,
skipped files and the command of every stage. Used by tools/demo.py; no command line of its own."""

from __future__ import annotations

import os
import platform
import shutil
from pathlib import Path
from typing import Any

import demo_folder
from latentdit.io import atomic_path, read_json, write_json


def settings_json(s: Any) -> dict:
    d = dict(s.__dict__)
    for key in ("out", "data_dir", "data", "detector"):
        d[key] = str(d[key]) if d.get(key) else None
    d["cfg_scales"] = list(d["cfg_scales"])
    return d


def machine() -> dict:
    import torch

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def _metrics_row(label: str, m: dict) -> str:
    """One table row; a figure the metrics could not give (None or absent: too few images) shows as —."""
    def num(key: str, fmt: str, scale: float = 1.0) -> str:
        return format(m[key] * scale, fmt) if m.get(key) is not None else "—"

    kid = num("kid_mean", ".2f", 1000) + (f" ± {num('kid_std', '.2f', 1000)}" if m.get("kid_mean") is not None else "")
    return f"| {label} | {num('fid', '.2f')} | {kid} | {num('precision', '.3f')} | {num('recall', '.3f')} |"


def _labels_text(demo: Any) -> str:
    if demo.label_mode == "training":
        return ("labels in the training part's class proportions (the held-out part has the same ones; "
                "`sample_ddp.py --labels training`)")
    return "balanced labels"


def _intro(demo: Any, split: dict | None) -> list[str]:
    s = demo.s
    if split is None:
        return [f"Fashion-MNIST at {s.image_size}×{s.image_size} through the bundled KL-f8 VAE; a class-conditional "
                f"DiT trained for {s.train_minutes:g} min; samples by {demo.sampler_text()}; FID/KID of "
                f"{s.fid_samples} guided samples per scale (balanced labels) against {s.reference_samples} held-out "
                "test images.", ""]
    flat = split["layout"] == "flat"
    kind = ("one class (a flat folder): an unconditional DiT" if flat else
            f"{len(split['class_names'])} classes (one per subfolder): a class-conditional DiT")
    lines = [f"The image folder `{split['source']}` at {s.image_size}×{s.image_size} through the VAE `{demo.vae_spec()}`; "
             f"{kind} trained for {s.train_minutes:g} min; samples by {demo.sampler_text()}; FID/KID of "
             f"{s.fid_samples} samples per scale against the held-out images.", "",
             "## Split", "",
             f"{split['num_train']} training and {split['num_held_out']} held-out images. "
             f"{split['rule'].replace('``', '`')} "
             f"Here: --held-out {split['held_out_setting']}, seed {split['seed']}. The held-out files are listed in "
             "`split/held-out.txt`, the training files in `split/train.txt` (paths relative to the folder).", ""]
    if not flat:
        lines += ["| class | train | held out |", "|---|---|---|"]
        lines += [f"| {r['class']} | {r['train']} | {r['held_out']} |" for r in split["per_class"]]
        lines.append("")
    return lines


def _skipped(demo: Any) -> list[str]:
    """Unreadable files: skipped where they are read, counted here."""
    found = []
    manifest = demo.latents_dir / "manifest.json"
    if manifest.is_file():
        links = demo_folder.training_folder(demo.split_dir, demo.dataset())
        for b in read_json(manifest, "manifest").get("bad_files", []):  # paths of the links: shown relative
            path = Path(b["path"])
            found.append(("extraction (training part)",
                          path.relative_to(links).as_posix() if path.is_relative_to(links) else b["path"], b["reason"]))
    for label, path in (("reference (held out)", demo.reference_npz.parent / "skipped.json"),
                        ("floors (training part)", demo.out / "floors" / "floors.json")):
        if path.is_file():
            found += [(label, b["path"], b["reason"]) for b in read_json(path, "skip record").get("skipped", [])]
    lines = ["## Unreadable files", "",
             "A file that cannot be decoded (truncated, not an image, past Pillow's decompression-bomb limit) is "
             f"skipped where it is read and counted here: {len({path for _, path, _ in found})} file(s), listed by "
             "each stage that met them.", ""]
    if found:
        lines += ["| stage | file | reason |", "|---|---|---|"]
        lines += [f"| {stage} | `{path}` | {reason} |" for stage, path, reason in found[:50]]
        if len(found) > 50:
            lines.append(f"| … | {len(found) - 50} more | |")
        lines.append("")
    return lines


def report_markdown(demo: Any, table: dict, floors: dict, split: dict | None, summary: dict, steps: list,
                    losses: list) -> str:
    s = demo.s
    grid_what = "unconditional samples" if split and split["layout"] == "flat" else "one row per class"
    lines = ["# latentdit demo report", "", *_intro(demo, split),
             f"## Samples ({grid_what}, cfg {s.grid_cfg_scale:g}, {demo.sampler_text()})", "",
             "![samples](samples.png)", ""]
    if (demo.report_dir / "trajectory.png").exists():
        lines += ["## Denoising trajectory", "",
                  "For the first sample of a few rows: the current state x_t (decoded) and the model's estimate of "
                  "the clean image at that point of the chain, from pure noise (left) to the sample (right).", "",
                  "![trajectory](trajectory.png)", ""]
    if steps:
        lines += ["## Training loss", "", "![loss](loss.png)", "",
                  f"{len(steps)} logged points, last step {steps[-1]}, last loss {losses[-1]:.4f}.", ""]
    reference = ("the first {n} Fashion-MNIST test images (never trained on)".format(n=s.reference_samples)
                 if split is None else "the held-out images (never trained on, nor encoded for training)")
    lines += ["## FID / KID by guidance scale", "",
              f"Protocol: {s.fid_samples} samples per scale with {_labels_text(demo)}, {demo.sampler_text()}, seed "
              f"{s.seed}; reference: {reference}; TF-Inception pool3 features."]
    if split is not None:
        lines += ["", "Floors, scored the same way against the same reference in the same run: real training images "
                  "(a seeded draw of as many as the samples per scale: what a perfect generator scores) and the VAE's "
                  "reconstructions of those same images (what a perfect DiT scores with this VAE). Reconstructions "
                  "of the held-out images themselves would be compared with their own originals and sit too low."]
    lines += ["", "| cfg scale (or floor) | FID | KID ×1000 (± std) | precision | recall |", "|---|---|---|---|---|"]
    lines += [_metrics_row(f"floor: {name}", m) for name, m in floors.items()]
    lines += [_metrics_row(scale, m) for scale, m in table.items()]
    every = list(table.values()) + list(floors.values())
    subsets = sorted({(m["kid_subsets"], m["kid_subset_size"]) for m in every if m.get("kid_subsets")})
    spread = (f" KID's ± is the standard deviation of its estimate over {subsets[0][0]} random subsets of "
              f"{subsets[0][1]} images of each set (at most half of a set, so the subsets differ and ± shows how "
              "much the number moves with the sample)." if len(subsets) == 1 else "")
    lines += ["", "FID at a few hundred samples is biased upwards; KID is unbiased, so compare KID across runs."
              + spread, ""]
    if split is not None:
        lines += _skipped(demo)
    lines += ["## Stages: time and the command to rerun each", "", "| stage | seconds | command |", "|---|---|---|"]
    for r in summary["stages"]:
        lines.append(f"| {r['name']} | {r['seconds']:.1f} | `{r['command']}` |")
    m = summary["machine"]
    lines += ["", f"Machine: {m['processor']}, {m['cpu_count']} CPUs, {m['platform']}, torch {m['torch']}"
              + (f", GPU {m['cuda']}" if m["cuda"] else ", no GPU") + ".", "",
              "The resolved training config is in [config.yaml](config.yaml); all figures in "
              "[metrics.json](metrics.json) and [timings.json](timings.json).", ""]
    return "\n".join(lines)


def loss_curve(metrics_file: Path) -> tuple[list, list]:
    import json

    steps, losses = [], []
    if metrics_file.exists():
        for line in metrics_file.read_text().splitlines():
            rec = json.loads(line)
            if "loss" in rec and "step" in rec:
                steps.append(rec["step"])
                losses.append(rec["loss"])
    return steps, losses


def write_report(demo: Any) -> Path:
    """Loss curve, config copy, metrics.json, timings.json and README.md in the report folder."""
    from latentdit.visualize import save_line_plot

    demo.report_dir.mkdir(parents=True, exist_ok=True)
    steps, losses = loss_curve(demo.run_dir / "metrics.jsonl")
    if steps:
        save_line_plot(steps, losses, demo.report_dir / "loss.png", title="training loss (all processes)",
                       xlabel="step", ylabel="loss")
    if (demo.run_dir / "config.yaml").exists():
        shutil.copyfile(demo.run_dir / "config.yaml", demo.report_dir / "config.yaml")
    table = {f"{scale:g}": read_json(demo.metrics_json(scale), "metrics file")
             for scale in demo.s.cfg_scales if demo.metrics_json(scale).exists()}
    floors = {}
    if demo.folder:
        floors = {name: read_json(demo.floor_json(name), "metrics file")
                  for name in demo_folder.floor_paths(demo.out / "floors") if demo.floor_json(name).exists()}
    split_file = demo.split_dir / "split.json"
    split = read_json(split_file, "split record") if demo.folder and split_file.exists() else None
    write_json(demo.report_dir / "metrics.json", {**table, **{f"floor: {k}": v for k, v in floors.items()}})
    summary = {"stages": [r.__dict__ for r in demo.results], "settings": settings_json(demo.s),
               "machine": machine()}
    timings_file = demo.report_dir / "timings.json"
    if timings_file.exists():  # keep timings of stages not rerun this time
        old = {r["name"]: r for r in read_json(timings_file, "timings file").get("stages", [])}
        new = {r.name for r in demo.results}
        summary["stages"] = [r for name, r in old.items() if name not in new] + summary["stages"]
    write_json(timings_file, summary)
    path = demo.report_dir / "README.md"
    with atomic_path(path) as tmp:
        tmp.write_text(report_markdown(demo, table, floors, split, summary, steps, losses))
    return path

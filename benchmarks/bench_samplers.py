"""Sample quality per model evaluation: one trained DiT, several samplers, the same labels and seeds.

Takes the checkpoint and the held-out reference of a finished demo run (``python tools/demo.py``; any
``--out``), draws the same balanced labels and per-sample seeds with each sampler setting (with the demo's
Internal Guidance where its model has an internal head), and scores each against the demo's reference
images with FID, KID (± over subsets), precision and recall. Sample
quality does not depend on the machine's load, so this benchmark can share the machine; its timing
column is wall-clock seconds of sampling and is only comparable between rows of one quiet run.

    python benchmarks/bench_samplers.py --demo demo_output
    python benchmarks/bench_samplers.py --demo demo_output --samplers heun:10 ab2:10 dpm-2m:10:0.5 --samples 1000

A setting is ``SAMPLER:STEPS`` or ``SAMPLER:STEPS:TIME_SHIFT``. Resumable: finished samples and metrics are
kept under ``--out`` (default: DEMO/samplers) and reused.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from latentdit.cli import make_parser, non_negative_float, positive_int, run_main
from latentdit.errors import LatentDiTError

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from demo import Demo, DemoSettings  # noqa: E402  (tools/demo.py)

DEFAULT_SETTINGS = ("heun:10", "heun:5", "euler:10", "ab2:10", "dpm-2m:10", "ab2:10:0.5", "dpm-2m:10:0.5")


def parse_setting(text: str) -> tuple[str, int, float | None]:
    """``SAMPLER:STEPS[:TIME_SHIFT]`` → (sampler, steps, shift or None)."""
    from latentdit.diffusion import SAMPLERS

    parts = text.split(":")
    try:
        if len(parts) not in (2, 3):
            raise ValueError
        name, steps = parts[0], int(parts[1])
        shift = float(parts[2]) if len(parts) == 3 else None
    except ValueError:
        raise LatentDiTError(f"--samplers: expected SAMPLER:STEPS or SAMPLER:STEPS:TIME_SHIFT, got {text!r}") from None
    if name not in SAMPLERS:
        raise LatentDiTError(f"--samplers: unknown sampler {name!r} in {text!r}; choose one of {', '.join(SAMPLERS)}")
    if steps < 1 or (shift is not None and not shift > 0):
        raise LatentDiTError(f"--samplers: {text!r} needs STEPS ≥ 1 and TIME_SHIFT > 0")
    return name, steps, shift


def main(argv=None) -> int:
    from latentdit.diffusion import SAMPLERS

    p = make_parser(__doc__.split("\n\n")[0])
    p.add_argument("--demo", type=Path, default=Path("demo_output"), help="a finished demo run's --out folder")
    p.add_argument("--out", type=Path, default=None, help="results folder (default: DEMO/samplers)")
    p.add_argument("--samplers", nargs="+", default=list(DEFAULT_SETTINGS), help="SAMPLER:STEPS[:TIME_SHIFT] ...")
    p.add_argument("--samples", type=positive_int, default=1000, help="samples per setting (balanced labels)")
    p.add_argument("--cfg-scale", type=non_negative_float, default=1.5)
    p.add_argument("--internal-scale", type=non_negative_float, default=DemoSettings.internal_scale, metavar="W",
                   help="Internal Guidance weight where the model has an internal head (the demo's default; 1 = off)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    settings = [parse_setting(s) for s in args.samplers]  # every setting checked before any work
    demo = Demo(DemoSettings(out=args.demo, internal_scale=args.internal_scale))
    ckpt, reference = demo.checkpoint(), demo.reference_npz
    if not reference.is_file():
        raise LatentDiTError(f"--demo {args.demo}: no reference images at {reference}; run the demo first")
    internal = demo.internal_scale  # the demo's Internal Guidance where its model has an internal head
    out = args.out or args.demo / "samplers"
    rows = []
    for name, steps, shift in settings:
        tag = (f"{name}-{steps}" + (f"-shift{shift:g}" if shift is not None else "") + f"-cfg{args.cfg_scale:g}"
               + (f"-ig{internal:g}" if internal != 1.0 else ""))
        folder = out / tag
        cmd = [sys.executable, str(ROOT / "tools" / "sample_ddp.py"), "--ckpt", str(ckpt), "--num-samples",
               str(args.samples), "--cfg-scale", f"{args.cfg_scale:g}", "--sampler", name, "--num-steps", str(steps),
               "--seed", str(args.seed), "--out-dir", str(folder)]
        if shift is not None:
            cmd += ["--time-shift", f"{shift:g}"]
        cmd += demo.internal_flags()
        t0 = time.perf_counter()
        if not (folder / "samples.npz").is_file():
            subprocess.run(cmd, check=True)
        seconds = time.perf_counter() - t0
        metrics = folder / "metrics.json"
        if not metrics.is_file():
            subprocess.run([sys.executable, str(ROOT / "tools" / "fid.py"), str(reference), str(folder / "samples.npz"),
                            "--json", str(metrics)], check=True)
        m = json.loads(metrics.read_text())
        rows.append((name, steps, shift, SAMPLERS[name].evaluations(steps), seconds, m))

    print(f"\nsamplers on {ckpt} ({args.samples} samples each, balanced labels, seed {args.seed}, cfg "
          f"{args.cfg_scale:g}" + (f", Internal Guidance w {internal:g}" if internal != 1.0 else "")
          + f"; reference {reference})")
    print(f"{'sampler':<10} {'steps':>5} {'shift':>5} {'NFE':>4} {'FID':>7} {'KID x1000':>15} {'P':>5} {'R':>5} "
          f"{'sample s':>8}")
    for name, steps, shift, nfe, seconds, m in rows:
        print(f"{name:<10} {steps:>5} {'-' if shift is None else f'{shift:g}':>5} {nfe:>4} {m['fid']:>7.2f} "
              f"{1000 * m['kid_mean']:>7.2f} ± {1000 * m['kid_std']:<5.2f} {m['precision']:>5.3f} {m['recall']:>5.3f} "
              f"{seconds:>8.1f}")
    return 0


if __name__ == "__main__":
    run_main(main)

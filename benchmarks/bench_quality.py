"""Quality versus training budget for the default CPU recipe (configs/fashion_mnist.yaml).

Trains the demo's DiT for each budget (default 2, 5 and 15 minutes) from scratch on the same latents,
then measures FID / KID of guided samples against the same held-out Fashion-MNIST test images, and
prints one table. Later changes to the recipe are measured against these figures.

    python benchmarks/bench_quality.py                          # ≈ 22 min of training + evaluation
    python benchmarks/bench_quality.py --budgets 1 3 --fid-samples 200

Each budget gets its own folder under --out; latents and reference images are shared. Everything
is resumable: rerunning skips finished work (extraction shards, checkpoints, samples, cached features).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from latentdit.cli import finite_float, make_parser, non_negative_float, positive_int, run_main

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from demo import Demo, DemoSettings  # noqa: E402  (tools/demo.py)


def main(argv=None) -> int:
    p = make_parser(__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("bench_quality"))
    p.add_argument("--budgets", type=finite_float, nargs="+", default=[2.0, 5.0, 15.0], help="training minutes")
    p.add_argument("--cfg-scales", type=non_negative_float, nargs="+", default=[1.0, 3.0])
    p.add_argument("--fid-samples", type=positive_int, default=DemoSettings.fid_samples)
    p.add_argument("--reference-samples", type=positive_int, default=DemoSettings.reference_samples)
    p.add_argument("--extract-limit", type=positive_int, default=DemoSettings.extract_limit)
    args = p.parse_args(argv)

    shared = dict(data_dir=args.out / "data", cfg_scales=tuple(args.cfg_scales), fid_samples=args.fid_samples,
                  reference_samples=args.reference_samples, extract_limit=args.extract_limit)
    Demo(DemoSettings(out=args.out / "data", **shared)).run(["extract", "reference"])
    rows = []
    for minutes in args.budgets:
        demo = Demo(DemoSettings(out=args.out / f"train-{minutes:g}min", train_minutes=minutes, **shared))
        demo.run(["train", "samples", "fid"])
        steps = json.loads(demo.checkpoint().parent.joinpath("state.json").read_text())["step"]
        for scale in args.cfg_scales:
            m = json.loads(demo.metrics_json(scale).read_text())
            rows.append((minutes, steps, scale, m["fid"], m["kid_mean"], m["kid_std"]))
    print(f"\nquality vs training budget ({args.fid_samples} samples per point, "
          f"{args.reference_samples} held-out test images)")
    print(f"{'minutes':>8} {'steps':>6} {'cfg':>5} {'FID':>8} {'KID x1000':>16}")
    for minutes, steps, scale, fid, kid, kid_std in rows:
        print(f"{minutes:>8g} {steps:>6d} {scale:>5g} {fid:>8.2f} {kid * 1000:>9.2f} ± {kid_std * 1000:<5.2f}")
    return 0


if __name__ == "__main__":
    run_main(main)

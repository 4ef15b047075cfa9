"""The main job end to end on the offline default: Fashion-MNIST → bundled KL-f8 VAE latents →
class-conditional DiT → guided samples → FID/KID, with a report folder.

    python tools/demo.py                       # everything, into demo_output/
    python tools/demo.py --only fid report     # rerun chosen stages (finished work is kept)
"""

from __future__ import annotations

from pathlib import Path

from latentdit.cli import make_parser, non_negative_float, parse_with_overrides, positive_int, run_main
from latentdit.pipeline import STAGES, Demo, DemoSettings
from latentdit.sampling import SAMPLERS


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

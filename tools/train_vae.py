"""Train the small KL-f8 ``AutoencoderKL`` that latentdit bundles, on Fashion-MNIST
(the recipe: ``latentdit.vae_training``; its settings: ``configs/vae_fashion_mnist.yaml``).

    python tools/train_vae.py --config configs/vae_fashion_mnist.yaml --out /tmp/vae_run
    python tools/train_vae.py --out /tmp/vae_run --resume          # continue after a stop
"""

from __future__ import annotations

import dataclasses
import shlex
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

from latentdit.cli import make_parser, non_negative_float, positive_int, run_main
from latentdit.vae_training import VAETrainConfig, load_config, train_vae


def build_parser():
    p = make_parser("Train the bundled KL-f8 AutoencoderKL on Fashion-MNIST (see configs/vae_fashion_mnist.yaml).")
    p.add_argument("--out", required=True, type=Path, help="run folder: checkpoints/, samples/, vae/ (the result)")
    p.add_argument("--config", type=Path, default=None, help="YAML file of config fields (flags override it)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/latest.json")
    p.add_argument("--max-minutes", type=non_negative_float, default=None,
                   help="stop training after this many minutes (checkpoint, then export as usual)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--contention-note", default="", help="free text added to the model card's wall-time line")
    group = p.add_argument_group("config fields (override the YAML)")
    for f in dataclasses.fields(VAETrainConfig):
        group.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=None, metavar="VALUE",
                           help=f"default {f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default!r}")
    return p


def _overrides(args) -> dict[str, Any]:
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(VAETrainConfig)}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = load_config(args.config, _overrides(args))
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    command = "python tools/train_vae.py " + shlex.join(list(argv) if argv is not None else sys.argv[1:])
    train_vae(cfg, args.out, resume=args.resume, max_minutes=args.max_minutes,
              contention_note=args.contention_note, command=command)
    return 0


if __name__ == "__main__":
    run_main(main)

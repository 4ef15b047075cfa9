"""Train a small KL-f8 ``AutoencoderKL`` on Fashion-MNIST or your own image folder
(the recipe: ``latentdit.vae.training``; settings: ``configs/vae_*.yaml``, overridable as section.field=value).

    python tools/train_vae.py --config configs/vae_fashion_mnist.yaml --out runs/vae
    python tools/train_vae.py --config configs/vae_clipart.yaml --data /path/to/images --out runs/vae_mine
    python tools/train_vae.py --config configs/vae_clipart.yaml --out runs/vae_mine --resume   # after a stop
    python -m latentdit.launch --num_processes 2 tools/train_vae.py --config ... --out ...  # data parallel
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Sequence

import torch

from latentdit.cli import make_parser, non_negative_float, positive_int, run_main
from latentdit.vae.config import load_vae_config
from latentdit.vae.training import train_vae


def build_parser():
    p = make_parser("Train a KL-f8 AutoencoderKL on Fashion-MNIST or an image folder "
                    "(see configs/vae_fashion_mnist.yaml, configs/vae_clipart.yaml).")
    p.add_argument("--out", required=True, type=Path, help="run folder: checkpoints/, samples/, vae/ (the result)")
    p.add_argument("--config", type=Path, default=None, help="YAML file with sections data, model, loss, train")
    p.add_argument("--data", default=None,
                   help="'fashion-mnist', an ImageNet-layout folder or a flat folder (sets data.source)")
    p.add_argument("--image-size", type=positive_int, default=None, help="sets data.image_size")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in OUT/checkpoints")
    p.add_argument("--max-minutes", type=non_negative_float, default=None,
                   help="stop training after this many minutes of the run's training time, resumes included "
                        "(checkpoint, then export as usual; 0 = no limit); sets train.max_minutes")
    p.add_argument("--threads", type=positive_int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--intended-use", default="", help="model card text: what kinds of images the VAE suits")
    p.add_argument("--history", default="", help="model card text: earlier versions and their figures")
    p.add_argument("--contention-note", default="", help="free text added to the model card's wall-time line")
    p.add_argument("overrides", nargs="*", metavar="section.field=value",
                   help="config overrides, e.g. train.steps=200 loss.disc_weight=0.5")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)  # overrides may come before and after the options
    overrides = list(args.overrides)
    if args.data is not None:
        overrides.append(f"data.source={args.data}")
    if args.image_size is not None:
        overrides.append(f"data.image_size={args.image_size}")
    if args.max_minutes is not None:
        overrides.append(f"train.max_minutes={args.max_minutes}")
    cfg = load_vae_config(args.config, overrides)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    command = "python tools/train_vae.py " + shlex.join(list(argv) if argv is not None else sys.argv[1:])
    train_vae(cfg, args.out, resume=args.resume, contention_note=args.contention_note, command=command,
              intended_use=args.intended_use, history=args.history)
    return 0


if __name__ == "__main__":
    run_main(main)

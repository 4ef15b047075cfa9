"""Encode a dataset into sharded VAE latent moments (+ flips) and a manifest, for training on latents.

    python tools/extract.py --data fashion-mnist --image-size 64 --out runs/latents/fmnist
    accelerate launch --multi_gpu --num_processes 2 tools/extract.py --data /data/imagenet --split train \
        --image-size 256 --vae stabilityai/sd-vae-ft-ema --out runs/latents/in256

Re-running the same command resumes an interrupted extraction (with any number of processes).
``python -m latentdit.launch`` in place of ``accelerate launch`` shows a user error once, with exit status 2.
"""

from __future__ import annotations

from typing import Sequence

from latentdit.cli import device_arg, make_parser, non_negative_int, positive_int, run_main


def main(argv: Sequence[str] | None = None) -> int:
    import torch

    from latentdit.data.latent_norm import LATENT_NORMS
    from latentdit.data.latents import STORAGE_DTYPES
    from latentdit.extraction import ExtractionSettings, extract_latents
    from latentdit.vae import BUNDLED_RGB_VAE, BUNDLED_VAE

    p = make_parser(__doc__.strip().splitlines()[0])
    p.add_argument("--data", default="fashion-mnist",
                   help="'fashion-mnist' or an image folder (ImageNet layout: one subfolder per class; else flat)")
    p.add_argument("--split", default="train", help="dataset split (fashion-mnist: train/test; a folder with "
                   "train/ val/ subfolders is entered at this split)")
    p.add_argument("--image-size", type=positive_int, default=64, help="images are center-cropped to this size")
    p.add_argument("--vae", default=None, help="bundled VAE name, a save_pretrained folder or a hub id (default: "
                   f"{BUNDLED_VAE} for fashion-mnist, {BUNDLED_RGB_VAE} for image folders)")
    p.add_argument("--latent-norm", choices=LATENT_NORMS, default="scalar",
                   help="how training normalises the latents: x scaling_factor, or per channel with the VAE's "
                   "latents_mean / latents_std (recorded in the manifest)")
    p.add_argument("--out", required=True, help="output directory for the shards and manifest.json")
    p.add_argument("--batch-size", type=positive_int, default=32, help="images per encoder call (per process)")
    p.add_argument("--num-workers", type=non_negative_int, default=2, help="DataLoader workers decoding images")
    p.add_argument("--shard-size", type=positive_int, default=4096, help="items per shard file")
    p.add_argument("--no-flip", action="store_true", help="do not store the moments of the horizontal flips")
    p.add_argument("--limit", type=positive_int, default=None, help="encode only the first N items")
    p.add_argument("--dtype", choices=sorted(STORAGE_DTYPES), default="float16", help="storage dtype of the moments")
    p.add_argument("--vae-dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                   help="compute dtype of the encoder (float16/bfloat16 for GPUs)")
    p.add_argument("--device", type=device_arg, default="auto",
                   help="auto (the process's accelerator, else cpu), cpu, cuda, cuda:1, ...")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)

    settings = ExtractionSettings(
        data=args.data, out=args.out, vae=args.vae, split=args.split, image_size=args.image_size,
        batch_size=args.batch_size, num_workers=args.num_workers, shard_size=args.shard_size, flip=not args.no_flip,
        limit=args.limit, dtype=args.dtype, latent_norm=args.latent_norm,
        device=None if args.device == "auto" else args.device, vae_dtype=getattr(torch, args.vae_dtype),
        progress=not args.no_progress)
    report = extract_latents(settings)

    if report.is_main_process:
        print(report.format())
    return 0


if __name__ == "__main__":
    run_main(main)

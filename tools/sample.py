"""Sample class-conditional images from a trained DiT and write a labelled PNG grid (one row per label).

    python tools/sample.py --ckpt runs/demo/ema.safetensors --labels Trouser,Bag,7 --cfg-scale 4 --out grid.png
    python tools/sample.py --ckpt DiT-XL-2-256x256.pt --vae stabilityai/sd-vae-ft-ema --labels 207,360 \\
        --guided-channels 3 --sampler dpm-solver --num-steps 25
    python tools/sample.py --ckpt runs/flow/ema.safetensors --sampler heun --num-steps 20   # a flow model
    python tools/sample.py --ckpt runs/demo --guide runs/demo/checkpoints/step-0002000 --guide-scale 2 \
        --cfg-scale 1   # autoguidance by an earlier checkpoint of the run
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from latentdit import sampling as S
from latentdit.cli import (device_arg, existing_path, make_parser, non_negative_int, output_file, output_folder,
                           positive_int, run_main)
from latentdit.cli.sampling import (PRECISIONS, add_label_table_arguments, add_sampler_arguments, load_guide,
                                    parse_labels, resolve_device, resolve_dtype, settings_from_args)


def build_parser():
    p = make_parser(__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True, type=existing_path,
                   help="weights (.safetensors / released .pt), a checkpoint folder step-XXXXXXX, or a run folder")
    p.add_argument("--model", default=None, help="model config name, e.g. DiT-XL/2 (only for files without metadata)")
    p.add_argument("--labels", default=None,
                   help="comma-separated class ids or names, e.g. 0,3,Trouser (default: every class, up to 16)")
    p.add_argument("--samples-per-label", type=positive_int, default=8, help="images per label (one grid row)")
    add_label_table_arguments(p)
    add_sampler_arguments(p, cfg_scale=4.0)
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--vae", default=None,
                   help="VAE: bundled name, local folder or hub id (default: the checkpoint's, else the bundled one)")
    p.add_argument("--out", type=output_file, default=Path("samples.png"), help="grid PNG to write")
    p.add_argument("--save-individual", type=output_folder, default=None, metavar="DIR",
                   help="also write one PNG per sample")
    p.add_argument("--trajectory", type=output_file, default=None, metavar="PNG",
                   help="also write the denoising trajectory of the grid's first sample of each label (up to 4 "
                        "labels): decoded x_t and predicted x0 at 8 points along the sampler's chain")
    p.add_argument("--device", type=device_arg, default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="autocast dtype on GPU (auto: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--batch-size", type=positive_int, default=32, help="samples per forward batch")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from latentdit.models.guidance import check_guidance_possible
    from latentdit.visualize import save_labeled_grid
    from latentdit.weights import load_model_for_sampling, load_vae_for

    # every output path and setting is checked (the paths by the parser) before any sampling
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.precision, device)
    settings = settings_from_args(args)
    ckpt = load_model_for_sampling(args.ckpt, args.model, device=device, num_classes=args.num_classes,
                                   null_class=not args.no_null_class)
    labels = (parse_labels(args.labels, ckpt.num_classes, ckpt.class_names) if args.labels is not None
              else S.default_labels(ckpt.num_classes))
    settings = settings.resolved(ckpt.process, ckpt.model.in_channels, guide=load_guide(args, ckpt, device),
                                 internal_head=S.has_internal_head(ckpt.model))
    check_guidance_possible(ckpt.model, settings.cfg_scale)
    vae = load_vae_for(ckpt, args.vae, device=device)

    per_sample = [lab for lab in labels for _ in range(args.samples_per_label)]
    print(f"sampling {len(per_sample)} images ({len(labels)} labels × {args.samples_per_label}) from {ckpt.path} "
          f"({ckpt.process.name} model) with {settings.describe()}, on {device}", flush=True)
    latents = S.sample_seeded(ckpt.model, per_sample, settings, seed=args.seed, batch_size=args.batch_size,
                              progress=True, device=device, dtype=dtype)
    images = S.decode_images(vae, latents.to(device), batch_size=args.batch_size, norm=ckpt.latent_norm)
    names = [S.label_text(lab, ckpt.class_names) for lab in labels]
    path = save_labeled_grid(images, names, args.out, nrow=args.samples_per_label)
    print(f"wrote {path}")
    if args.save_individual is not None:
        paths = S.save_individual_pngs(images, per_sample, args.save_individual, ckpt.class_names)
        print(f"wrote {len(paths)} PNGs to {args.save_individual}")
    if args.trajectory is not None:
        shown = labels[:4]
        path = S.save_denoising_trajectory(
            ckpt.model, vae, shown, args.trajectory, settings, seed=args.seed,
            indices=[k * args.samples_per_label for k in range(len(shown))],  # the grid's first column
            class_names=ckpt.class_names, device=device, dtype=dtype, norm=ckpt.latent_norm)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    run_main(main)

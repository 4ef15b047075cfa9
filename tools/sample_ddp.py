"""Many samples for FID, across processes: writes the ADM-style .npz (arr_0: uint8 N×H×W×3, arr_1: labels).

    accelerate launch --multi_gpu --num_processes 8 tools/sample_ddp.py --ckpt run/ema.safetensors \\
        --num-samples 50000 --cfg-scale 1.5 --out-dir samples/cfg1.5

Labels are balanced (sample i has class i % num_classes), or with --labels training in the proportions
of the training data's classes as the weights record them (the protocol for a reference set with those
proportions, e.g. the held-out part of an unbalanced image folder); sample i's initial and step noise
come from a generator seeded by (--seed, i), so the result depends neither on the number of
processes nor on --batch-size. Work is cut into chunks
written atomically under OUT_DIR/.chunks/; after a kill, run the same command again: finished
chunks are kept and only the missing ones are sampled. The main process finally writes
OUT_DIR/samples.npz.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import torch

from latentdit import sample_store as store
from latentdit import sampling as S
from latentdit.cli import make_parser, non_negative_int, output_folder, positive_int, run_main
from latentdit.cli.sampling import (PRECISIONS, add_label_table_arguments, add_sampler_arguments, load_guide,
                                    resolve_dtype, settings_from_args)
from latentdit.distributed import WAIT_FOR_PEERS_TIMEOUT
from latentdit.errors import LatentDiTError


def build_parser():
    p = make_parser(__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True, help="weights file, checkpoint folder step-XXXXXXX, or run folder")
    p.add_argument("--model", default=None, help="model config name (needed only when the file has no metadata)")
    p.add_argument("--num-samples", type=positive_int, default=50_000)
    add_label_table_arguments(p)
    p.add_argument("--labels", choices=store.LABEL_MODES, default="balanced",
                   help="balanced: every class equally often; training: in the proportions of the classes the "
                        "model was trained on (recorded in weights written by tools/train.py)")
    add_sampler_arguments(p, cfg_scale=1.5)
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--vae", default=None, help="VAE spec (default: the checkpoint's, else the bundled VAE)")
    p.add_argument("--out-dir", required=True, type=output_folder, help="folder for .chunks/ and samples.npz")
    p.add_argument("--chunk-size", type=positive_int, default=256, help="samples per chunk file")
    p.add_argument("--batch-size", type=positive_int, default=64, help="samples per forward batch")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="autocast dtype on GPU (auto: bf16 on GPU, fp32 on CPU)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from accelerate import PartialState

    from latentdit.models.guidance import check_guidance_possible
    from latentdit.weights import load_model_for_sampling, load_vae_for

    # without a GPU, accelerate joins the launched processes in a gloo group only when asked for CPU;
    # a long timeout lets ranks that finish early wait at the final barrier
    state = PartialState(cpu=not torch.cuda.is_available(), timeout=WAIT_FOR_PEERS_TIMEOUT)
    device = state.device
    dtype = resolve_dtype(args.precision, device)

    sampling = settings_from_args(args)
    ckpt = load_model_for_sampling(args.ckpt, args.model, device=device, num_classes=args.num_classes,
                                   null_class=not args.no_null_class)
    sampling = sampling.resolved(ckpt.process, ckpt.model.in_channels, guide=load_guide(args, ckpt, device),
                                 internal_head=S.has_internal_head(ckpt.model))
    check_guidance_possible(ckpt.model, sampling.cfg_scale)  # before any output is written
    if args.batch_size > args.chunk_size:
        raise LatentDiTError(f"--batch-size ({args.batch_size}) must not exceed --chunk-size ({args.chunk_size})")
    if args.labels == "training" and ckpt.class_counts is None:
        raise LatentDiTError(f"--labels training: {ckpt.path} records no training class counts (weights from "
                             "an older latentdit or a released DiT); use --labels balanced")
    vae = load_vae_for(ckpt, args.vae, device=device, dtype=dtype or torch.float32)

    out_dir: Path = args.out_dir
    chunk_dir = out_dir / store.CHUNK_DIR
    total = store.num_chunks(args.num_samples, args.chunk_size)
    settings = {
        "ckpt": str(ckpt.path.resolve()), "ckpt_bytes": ckpt.path.stat().st_size, "model": ckpt.model_name,
        "num_samples": args.num_samples, "num_classes": ckpt.num_classes, "process": ckpt.process.metadata(),
        "cfg_scale": sampling.cfg_scale,
        "guidance_interval": list(sampling.guidance_interval) if sampling.guidance_interval else None,
        "guided_channels": sampling.guided_channels, "sampler": sampling.sampler, "num_steps": sampling.num_steps,
        "time_shift": sampling.time_shift, "ddim_map": sampling.ddim_map, "seed": args.seed, "vae": vae.spec,
        "chunk_size": args.chunk_size,
        "precision": str(dtype).replace("torch.", "") if dtype else "fp32",
    }
    if sampling.internal_scale != 1.0:  # only then, so chunk folders written without it still match
        settings.update(internal_scale=sampling.internal_scale,
                        internal_interval=list(sampling.internal_interval) if sampling.internal_interval else None)
    if args.labels != "balanced":  # only then, so chunk folders written with balanced labels still match
        settings.update(labels=args.labels, class_counts=ckpt.class_counts)
    if sampling.guide is not None:  # only then, so chunk folders written without autoguidance still match
        guide_path = sampling.guide.path
        settings.update(guide=str(guide_path.resolve()), guide_bytes=guide_path.stat().st_size,
                        guide_scale=sampling.guide_scale,
                        guide_interval=list(sampling.guide_interval) if sampling.guide_interval else None)
    if state.is_main_process:
        store.prepare_chunk_dir(chunk_dir, settings)
    state.wait_for_everyone()
    store.prepare_chunk_dir(chunk_dir, settings, create=False)  # every rank fails alike on a mismatch
    missing = store.missing_chunks(chunk_dir, total)
    state.wait_for_everyone()  # every rank has listed before anyone writes
    mine = missing[state.process_index::state.num_processes]
    if state.is_main_process:
        print(f"{total - len(missing)}/{total} chunks already done; sampling {len(missing)} chunk(s) "
              f"on {state.num_processes} process(es) into {chunk_dir}", flush=True)

    bar = None
    if state.is_main_process and mine:
        from tqdm.auto import tqdm
        bar = tqdm(total=store.samples_in_chunks(mine, args.num_samples, args.chunk_size),
                   desc=f"samples (rank 0 of {state.num_processes})", unit="img")
    all_labels = (store.proportional_labels(args.num_samples, ckpt.class_counts) if args.labels == "training"
                  else store.balanced_labels(range(args.num_samples), ckpt.num_classes))
    t0 = time.perf_counter()
    for k in mine:
        idx = store.chunk_range(k, args.num_samples, args.chunk_size)
        labels = all_labels[idx.start:idx.stop]
        latents = S.sample_seeded(ckpt.model, labels, sampling, seed=args.seed, first_index=idx.start,
                                  batch_size=args.batch_size, device=device, dtype=dtype)
        images = S.decode_to_uint8(vae, latents.to(device), batch_size=args.batch_size, norm=ckpt.latent_norm)
        store.write_chunk(store.chunk_path(chunk_dir, k), images, labels)
        if bar is not None:
            bar.update(len(idx))
    if bar is not None:
        bar.close()
    state.wait_for_everyone()

    if state.is_main_process:
        out = store.gather_chunks(chunk_dir, args.num_samples, args.chunk_size, out_dir / "samples.npz")
        dt = time.perf_counter() - t0
        print(f"wrote {out} ({args.num_samples} samples; this run sampled {len(missing)} chunk(s) in {dt:.1f} s)")
    state.wait_for_everyone()
    return 0


if __name__ == "__main__":
    run_main(main)

"""Sampling benchmark: images/s (and, with --fid-ref, FID/KID) per sampler: by default DDPM-250, DDIM-50 and
DPM-Solver-25 for a DDPM model, Euler-50, Heun-20 and Euler–Maruyama-100 for a flow model.

    python benchmarks/bench_sample.py                                   # random DiT-S/2, 32×32×4 latents
    python benchmarks/bench_sample.py --process flow                    # the same, as a flow model
    python benchmarks/bench_sample.py --ckpt runs/demo/ema.safetensors --fid-ref held_out/ --fid-samples 2000

Throughput counts latent sampling only (the VAE decode is excluded): guided forwards over the doubled
batch, at the given cfg scale. With --fid-ref (an image folder, an ``arr_0`` .npz or a stats .npz of
held-out images), each sampler also generates --fid-samples class-balanced images (sample i has class
i % num_classes, noise seeded by (--seed, i), so every sampler starts from the same noise), decodes
them and scores them with ``latentdit.metrics.compute_metrics``. Prints a side-by-side table.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from latentdit import sampling as S
from latentdit.cli import existing_path, make_parser, non_negative_float, non_negative_int, positive_int, run_main
from latentdit.cli.sampling import PRECISIONS, parse_guided_channels, resolve_device, resolve_dtype
from latentdit.diffusion.samplers import SAMPLERS as SAMPLER_SPECS
from latentdit.errors import LatentDiTError
from latentdit.sample_store import balanced_labels
from latentdit.weights import SamplingCheckpoint, load_model_for_sampling, load_vae_for
from timing import sync


def default_sampler_specs(process) -> str:
    """Every sampler of ``process`` at its default number of steps, e.g. ``ddpm-250,ddim-50,dpm-solver-25``."""
    return ",".join(f"{name}-{S.DEFAULT_NUM_STEPS[name]}" for name in process.samplers)


def parse_sampler_specs(text: str) -> list[tuple[str, int]]:
    """``"ddpm-250,ddim-50,dpm-solver-25"`` → [("ddpm", 250), ...]."""
    out = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        name, _, steps = item.rpartition("-")
        if name not in S.SAMPLERS or not steps.isdigit() or int(steps) < 1:
            raise LatentDiTError(f"--samplers entry {item!r} should be SAMPLER-STEPS with SAMPLER one of "
                                 f"{', '.join(S.SAMPLERS)}, e.g. dpm-solver-25")
        out.append((name, int(steps)))
    if not out:
        raise LatentDiTError("--samplers is empty")
    return out


def build_parser():
    p = make_parser(__doc__.splitlines()[0])
    p.add_argument("--ckpt", type=existing_path, default=None, help="weights to benchmark (default: random DiT-S/2)")
    p.add_argument("--model", default=None,
                   help="model config name for files without metadata; without --ckpt, the random model's "
                        "(default DiT-S/2)")
    p.add_argument("--samplers", default=None, help="comma-separated SAMPLER-STEPS (default: every sampler of the model's process at "
                        "its default steps)")
    p.add_argument("--process", choices=("ddpm", "flow"), default="ddpm",
                   help="process of the random model (without --ckpt; a checkpoint names its own)")
    p.add_argument("--cfg-scale", type=non_negative_float, default=1.5)
    p.add_argument("--guided-channels", default="all")
    p.add_argument("--num-images", type=positive_int, default=8, help="images per throughput measurement")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", choices=PRECISIONS, default="auto")
    p.add_argument("--fid-ref", default=None, help="held-out images (folder / arr_0 .npz / stats .npz)")
    p.add_argument("--fid-samples", type=positive_int, default=1000, help="generated images per sampler for FID")
    p.add_argument("--fid-batch-size", type=positive_int, default=None, help="batch for FID sampling (default --batch-size)")
    p.add_argument("--vae", default=None, help="VAE for decoding (default: the checkpoint's, else the bundled VAE)")
    p.add_argument("--json", type=Path, default=None, help="also write the results as JSON")
    return p


def _random_checkpoint(device: torch.device, process_name: str, name: str = "DiT-S/2") -> SamplingCheckpoint:
    from latentdit.diffusion import build_process
    from latentdit.models.registry import create_dit

    flow = process_name == "flow"
    model = create_dit(name, input_size=32, num_classes=1000, learn_sigma=not flow).to(device).eval()
    return SamplingCheckpoint(model=model, path=Path(f"<random {name}>"), model_name=name,
                                class_names=None, vae_spec=None, process=build_process({"process": process_name}))


def _time_sampling(ckpt: SamplingCheckpoint, labels: list[int], settings: S.ResolvedSettings, *, seed: int,
                   batch_size: int, device: torch.device, **kw: Any) -> tuple[torch.Tensor, float]:
    sync(device)
    t0 = time.perf_counter()
    latents = S.sample_seeded(ckpt.model, labels, settings, seed=seed, batch_size=batch_size, device=device, **kw)
    sync(device)
    return latents, time.perf_counter() - t0


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.precision, device)
    if args.fid_ref is not None and args.ckpt is None:
        raise LatentDiTError("--fid-ref needs --ckpt (FID of a random model means nothing)")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    ckpt = (load_model_for_sampling(args.ckpt, args.model, device=device) if args.ckpt
            else _random_checkpoint(device, args.process, args.model or "DiT-S/2"))
    specs = parse_sampler_specs(args.samplers or default_sampler_specs(ckpt.process))
    settings = {(name, steps): S.SamplerSettings(sampler=name, num_steps=steps, cfg_scale=args.cfg_scale,
                                                 guided_channels=parse_guided_channels(args.guided_channels)
                                                 ).resolved(ckpt.process, ckpt.model.in_channels)
                for name, steps in specs}
    cfg_scale = settings[specs[0]].cfg_scale
    n_params = sum(p.numel() for p in ckpt.model.parameters())
    print(f"model {ckpt.model_name or '?'} ({n_params / 1e6:.1f} M params) from {ckpt.path}; latents "
          f"{ckpt.model.in_channels}×{ckpt.model.input_size}×{ckpt.model.input_size}; device {device}"
          f"{f' ({torch.cuda.get_device_name(device)})' if device.type == 'cuda' else ''}; "
          f"precision {str(dtype).replace('torch.', '') if dtype else 'fp32'}; cfg {cfg_scale}; "
          f"{args.num_images} images in batches of {args.batch_size}", flush=True)

    common = dict(dtype=dtype)
    labels = balanced_labels(range(args.num_images), ckpt.num_classes)
    # warm-up: kernels, allocator, the diffusers import for dpm-solver
    for name, steps in specs:
        _time_sampling(ckpt, labels[:args.batch_size], dataclasses.replace(settings[name, steps], num_steps=2),
                       seed=args.seed, batch_size=args.batch_size, device=device, **common)

    vae = None
    if args.fid_ref is not None:
        from latentdit.metrics import FeatureSettings, MetricSettings, compute_metrics, load_source

        vae = load_vae_for(ckpt, args.vae, device=device)
        # reference features once (cached on disk), reused for every sampler
        ref_stats = load_source(args.fid_ref, FeatureSettings(device=device), need_features=True)

    rows = []
    for name, steps in specs:
        _, seconds = _time_sampling(ckpt, labels, settings[name, steps], seed=args.seed, batch_size=args.batch_size,
                                    device=device, **common)
        nfe = SAMPLER_SPECS[name].evaluations(steps) * (2 if cfg_scale != 1.0 else 1)
        row = dict(sampler=name, steps=steps, nfe_per_image=nfe, images_per_s=args.num_images / seconds,
                   s_per_image=seconds / args.num_images, ms_per_step=1000 * seconds / steps
                   / -(-args.num_images // args.batch_size), fid=None, kid_mean=None, kid_std=None)
        print(f"{name}-{steps}: {row['images_per_s']:.3f} images/s ({seconds:.1f} s)", flush=True)
        if vae is not None:
            fid_labels = balanced_labels(range(args.fid_samples), ckpt.num_classes)
            latents, fid_seconds = _time_sampling(
                ckpt, fid_labels, settings[name, steps], seed=args.seed,
                batch_size=args.fid_batch_size or args.batch_size, device=device, progress=True, **common)
            images = S.decode_to_uint8(vae, latents.to(device), batch_size=args.fid_batch_size or args.batch_size)
            m = compute_metrics(ref_stats, images, MetricSettings(pr=False, kid_subset_size=min(1000, args.fid_samples),
                                                                  device=device))
            row.update(fid=m["fid"], kid_mean=m["kid_mean"], kid_std=m["kid_std"], fid_samples=args.fid_samples,
                       fid_sampling_s=fid_seconds)
            print(f"{name}-{steps}: FID {m['fid']:.3f}", flush=True)
        rows.append(row)

    header = f"{'sampler':<16}{'NFE/img':>8}{'img/s':>10}{'s/img':>10}{'ms/step':>10}{'FID':>10}{'KID×1e3':>16}"
    print("\n" + header + "\n" + "-" * len(header))
    for r in rows:
        kid = "-" if r["kid_mean"] is None else f"{1e3 * r['kid_mean']:.2f}±{1e3 * r['kid_std']:.2f}"
        print(f"{r['sampler'] + '-' + str(r['steps']):<16}{r['nfe_per_image']:>8}{r['images_per_s']:>10.3f}"
              f"{r['s_per_image']:>10.2f}{r['ms_per_step']:>10.1f}{_fmt(r['fid'], '.3f'):>10}{kid:>16}")
    if rows[0]["fid"] is not None:
        ref = next((r for r in rows if r["sampler"] == ckpt.process.default_sampler), rows[0])
        if ref is not None:
            for r in rows:
                if r is not ref:
                    print(f"{r['sampler']}-{r['steps']} FID vs {ref['sampler']}-{ref['steps']}: "
                          f"{100 * (r['fid'] / ref['fid'] - 1):+.1f} %")
    if args.json is not None:
        from latentdit.io import write_json

        write_json(args.json, {"model": ckpt.model_name, "ckpt": str(ckpt.path), "device": str(device),
                               "cfg_scale": cfg_scale, "num_images": args.num_images,
                               "batch_size": args.batch_size, "rows": rows})
    return 0


if __name__ == "__main__":
    run_main(main)

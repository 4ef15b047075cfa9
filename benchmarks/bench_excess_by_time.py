"""Where along the denoising path a flow DiT loses quality: start its sampler part-way, from real latents.

Takes a finished Fashion-MNIST demo run (``python tools/demo.py``; any ``--out``), encodes held-out test images
that are neither in its reference nor trained on (the ``--count`` after the reference's first images), noises
their latents to time ``t`` (``x_t = (1 − t)·x0 + t·ε``, per-sample seeded noise), runs the demo's sampler from
``t`` to 0 with the images' own labels (``ceil(steps · t)`` steps on an even grid; the demo's cfg scale and
Internal Guidance), decodes, and scores each set against the demo's reference with KID and FID. ``t = 0`` is
the VAE floor of these images (their latents decoded as they are); ``t = 1`` is plain sampling with the
images' labels. A model that loses nothing below ``t`` scores the floor from ``t``: the rise of KID with ``t``
says how much of the samples' excess over the floor arises at which noise levels (coarse structure is fixed
by the real image at small ``t``, only detail is the model's).

    python benchmarks/bench_excess_by_time.py --demo demo_output
    python benchmarks/bench_excess_by_time.py --demo demo_output --times 0 0.2 0.4 0.6 0.8 1 --count 1000

Sample quality does not depend on the machine's load, so this benchmark can share the machine. Resumable:
finished sets and scores are kept under ``--out`` (default: DEMO/excess_by_time) and reused.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import torch

from latentdit.cli import make_parser, non_negative_float, positive_int, run_main
from latentdit.errors import LatentDiTError
from latentdit.io import atomic_path, read_json, write_json

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from demo import Demo, DemoSettings  # noqa: E402  (tools/demo.py)


def start_grid(process, t_start: float, steps_for_whole_path: int):
    """The even flow grid from ``t_start`` down to 0 with ``ceil(steps · t_start)`` steps (at least one)."""
    from latentdit.diffusion.flow import FlowGrid

    steps = max(1, math.ceil(steps_for_whole_path * t_start - 1e-9))
    return FlowGrid(process, tuple(float(t) for t in torch.linspace(t_start, 0.0, steps + 1, dtype=torch.float64)))


def denoise_from(model, process, settings, x0: torch.Tensor, labels: torch.Tensor, t_start: float, seed: int,
                 first_index: int = 0) -> torch.Tensor:
    """``x0`` noised to ``t_start`` with per-sample noise (index ``first_index + j``), then the sampler of
    ``settings`` (a :class:`latentdit.sampling.settings.ResolvedSettings`) from ``t_start`` to 0."""
    from latentdit.diffusion.samplers import SAMPLERS as SAMPLER_SPECS
    from latentdit.models.guidance import check_guidance_possible
    from latentdit.sampling.guidance import make_model_fn
    from latentdit.sampling.noise import per_sample_noise

    if settings.time_shift not in (None, 1.0):
        raise LatentDiTError(f"the model samples with time shift {settings.time_shift:g}; this benchmark walks an "
                             "even grid (time shift 1)")
    check_guidance_possible(model, settings.cfg_scale)
    if t_start == 0:
        return x0.clone()
    noise = per_sample_noise(seed, range(first_index, first_index + x0.shape[0]))
    x_t = (1.0 - t_start) * x0 + t_start * noise.draw(tuple(x0.shape), x0.device)
    model_fn = make_model_fn(model, labels, cfg_scale=settings.cfg_scale, internal_scale=settings.internal_scale)
    return SAMPLER_SPECS[settings.sampler].fn(model_fn, x_t, start_grid(process, t_start, settings.num_steps),
                                              noise=noise)


def check_record(path: Path, record: dict) -> None:
    """Results under ``--out`` are reused only for the same checkpoint, images, seed and sampling settings: the
    first run writes ``record``; a later one with other settings is refused, naming the fields."""
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, record)
        return
    old = read_json(path, "settings record")
    changed = [f"{k} {old.get(k)!r} → {v!r}" for k, v in record.items() if old.get(k) != v]
    if changed:
        raise LatentDiTError(f"{path}: the results there were made with other settings ({'; '.join(changed)}); "
                             "pass another --out or remove them")


def main(argv=None) -> int:
    from latentdit.data.fashion_mnist import FashionMNIST
    from latentdit.metrics.evaluate import MetricSettings, compute_metrics
    from latentdit.sampling import SamplerSettings
    from latentdit.sampling.images import decode_to_uint8
    from latentdit.sampling.internal import has_internal_head
    from latentdit.weights import load_model_for_sampling, load_vae_for

    p = make_parser(__doc__.split("\n\n")[0])
    p.add_argument("--demo", type=Path, default=Path("demo_output"), help="a finished Fashion-MNIST demo run's --out")
    p.add_argument("--out", type=Path, default=None, help="results folder (default: DEMO/excess_by_time)")
    p.add_argument("--times", type=non_negative_float, nargs="+", default=[0.0, 0.2, 0.4, 0.6, 0.8, 1.0],
                   metavar="T", help="flow times to start from, in [0, 1]")
    p.add_argument("--count", type=positive_int, default=1000, help="held-out test images per time")
    p.add_argument("--cfg-scale", type=non_negative_float, default=1.5)
    p.add_argument("--internal-scale", type=non_negative_float, default=DemoSettings.internal_scale, metavar="W",
                   help="Internal Guidance weight where the model has an internal head (the demo's default; 1 = off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=positive_int, default=250)
    args = p.parse_args(argv)

    if any(t > 1 for t in args.times):
        raise LatentDiTError(f"--times: flow times lie in [0, 1], got {args.times}")
    demo = Demo(DemoSettings(out=args.demo, internal_scale=args.internal_scale), log=lambda s: None)
    if demo.folder is not None or (demo.out / "split").exists():
        raise LatentDiTError(f"--demo {args.demo}: a folder demo; this benchmark takes held-out Fashion-MNIST "
                             "test images (a folder's held-out images are its reference)")
    if not demo.reference_npz.is_file():
        raise LatentDiTError(f"--demo {args.demo}: no reference images at {demo.reference_npz}; run the demo first")
    reference_count = int(np.load(demo.reference_npz)["arr_0"].shape[0])
    test = FashionMNIST(split="test", image_size=DemoSettings.image_size)
    if reference_count + args.count > len(test):
        raise LatentDiTError(f"--count {args.count}: only {len(test) - reference_count} test images lie after the "
                             f"reference's {reference_count}")
    ckpt = load_model_for_sampling(demo.checkpoint())
    if ckpt.process.name != "flow":
        raise LatentDiTError(f"{ckpt.path}: a {ckpt.process.name} model; starting part-way is built for flow models")
    model = ckpt.model.eval()
    settings = SamplerSettings(sampler=DemoSettings.sampler, num_steps=DemoSettings.num_steps, cfg_scale=args.cfg_scale,
                               internal_scale=demo.internal_scale).resolved(
        ckpt.process, int(model.in_channels), internal_head=has_internal_head(model))
    vae = load_vae_for(ckpt)
    norm = ckpt.latent_norm or vae.latent_norm()
    images, labels = test.batch(range(reference_count, reference_count + args.count))
    x0 = norm.normalize(vae.encode_moments_batched(images)[0])

    out = args.out or args.demo / "excess_by_time"
    record = {"checkpoint": ckpt.path.resolve().relative_to(demo.out).as_posix(), "count": args.count,
              "seed": args.seed, "sampling": settings.describe()}
    check_record(out / "settings.json", record)
    rows = []
    for t in dict.fromkeys(args.times):
        folder = out / f"t{t:g}"
        npz, scores = folder / "samples.npz", folder / "metrics.json"
        if not npz.is_file():
            parts = [denoise_from(model, ckpt.process, settings, x0[s:s + args.batch_size],
                                  labels[s:s + args.batch_size], t, args.seed, first_index=s)
                     for s in range(0, args.count, args.batch_size)]
            folder.mkdir(parents=True, exist_ok=True)
            with atomic_path(npz) as tmp, open(tmp, "wb") as f:
                np.savez(f, arr_0=decode_to_uint8(vae, torch.cat(parts), norm=ckpt.latent_norm),
                         arr_1=labels.numpy())
        if not scores.is_file():
            write_json(scores, compute_metrics(demo.reference_npz, npz, MetricSettings(pr=False, progress=False)))
        rows.append((t, read_json(scores, "metrics file")))

    print(f"\n{ckpt.path}: {args.count} held-out test images (after the reference's {reference_count}), noised to t "
          f"and sampled back ({settings.describe()}, ceil({settings.num_steps}·t) steps; seed {args.seed}); "
          f"reference {demo.reference_npz}")
    floor = next((m["kid_mean"] for t, m in rows if t == 0), None)
    print(f"{'t':>5} {'FID':>7} {'KID x1000':>15} {'above t=0':>9}")
    for t, m in rows:
        above = f"{1000 * (m['kid_mean'] - floor):>9.2f}" if floor is not None else f"{'-':>9}"
        print(f"{t:>5g} {m['fid']:>7.2f} {1000 * m['kid_mean']:>7.2f} ± {1000 * m['kid_std']:<5.2f} {above}")
    return 0


if __name__ == "__main__":
    run_main(main)

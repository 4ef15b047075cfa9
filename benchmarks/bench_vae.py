"""Reconstruction quality of VAEs: PSNR, colour (mean CIEDE2000 ΔE, latentdit.colour) and rFID/KID (reconstructions of N images vs the same N originals),
optionally FID/KID against a separate reference set (the demo protocol), with the figures of the
original images beside them. Uses latentdit.metrics (the TF-Inception FID network); ≈ 5–10 img/s on CPU.

    # the Fashion-MNIST VAE, demo protocol: reconstructions of 300 held-out test images (500..799, never
    # trained on) vs the demo's reference, test images 0..499
    python benchmarks/bench_vae.py --vae latentdit/kl-f8-fashion-mnist --data fashion-mnist --split test \\
        --start 500 --count 300 --reference-start 0 --reference-count 500
    # the clip-art VAE: its own held-out images (listed in its model card), and a collection it never saw
    python benchmarks/bench_vae.py --vae latentdit/kl-f8-clipart --data /usr/share/openclipart/png --card-held-out
    python benchmarks/bench_vae.py --vae latentdit/kl-f8-clipart --data /usr/share/tuxpaint/stamps --count 300

``--latent-noise 0.05 0.1 0.2`` also decodes the latents with Gaussian noise of those standard deviations added,
in the units a DiT learns them in (the latents scaled by the VAE's scaling_factor, which gives the bundled
VAEs' latents unit std): how precisely a diffusion model must
place its latents for this decoder, scored like the reconstructions.

    python benchmarks/bench_vae.py --vae latentdit/kl-f8-fashion-mnist --data fashion-mnist --split test \
        --start 500 --count 300 --reference-start 0 --reference-count 500 --latent-noise 0.05 0.1 0.2

``--update-card`` adds the figures to the VAE folder's model_card.json and MODEL_CARD.md. ``--grid-dir DIR``
writes, per VAE, the images of the set with the largest ΔE (originals above their reconstructions).
"""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from latentdit.colour import reconstruction_delta_e  # noqa: E402
from latentdit.vae import BUNDLED_VAE_CARD_JSON, VAE, psnr  # noqa: E402
from latentdit.cli import make_parser, non_negative_float, non_negative_int, positive_int, run_main  # noqa: E402
from latentdit.errors import LatentDiTError  # noqa: E402
from latentdit.io import read_json  # noqa: E402


def _to_uint8_hwc(images: torch.Tensor) -> np.ndarray:
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def load_images(data: str, split: str, image_size: int, indices: list[int] | None = None,
                names: list[str] | None = None, start: int = 0, count: int = 300) -> tuple[torch.Tensor, str]:
    """Images in ``[-1, 1]`` from ``data``: by item names (paths relative to the folder), by indices, items
    ``[start, start + count)`` (Fashion-MNIST), or ``count`` items of a folder drawn with seed ``start``.
    Unreadable files are skipped."""
    from latentdit.data import build_image_dataset

    ds = build_image_dataset(data, split, image_size)
    if names is not None:
        position = {n: i for i, n in enumerate(ds.relative_paths())}
        missing = [n for n in names if n not in position]
        if missing:
            raise LatentDiTError(f"{len(missing)} held-out images of the model card are not in {data} "
                                 f"(first: {missing[0]})")
        indices, what = [position[n] for n in names], f"{len(names)} held-out images listed in the model card"
    elif indices is None:
        folder = hasattr(ds, "relative_paths")
        if (count if folder else start + count) > len(ds):
            raise LatentDiTError(f"--start {start} --count {count}: {data} ({split}) has only {len(ds)} images")
        if folder:  # a folder stores its classes one after another: sample across all of them
            indices = sorted(int(i) for i in np.random.default_rng(start).permutation(len(ds))[:count])
            what = f"{len(indices)} images of {data} (seeded sample, seed {start})"
        else:
            indices = list(range(start, start + count))
            what = f"{split} images {start}..{start + count - 1} of {data}"
    items = [ds[i][0] for i in indices]
    images = [x for x in items if x is not None]
    return torch.stack(images), what


def noisy_reconstructions(vae: VAE, images: torch.Tensor, sigmas: list[float], seed: int = 0,
                          batch_size: int = 64) -> list[torch.Tensor]:
    """Decodes of ``images``' posterior means with Gaussian noise of std ``sigma`` (each of ``sigmas``) added to
    the scaled latents (:meth:`VAE.latent_norm`, the latents a DiT is trained on); the same noise draw,
    seeded by ``seed``, scaled for every sigma (0: the plain reconstruction)."""
    mean, _ = vae.encode_moments_batched(images, batch_size)
    norm = vae.latent_norm()
    latents = norm.normalize(mean)
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed))
    return [vae.decode_batched(latents + sigma * noise, batch_size, norm=norm) for sigma in sigmas]


def save_worst_delta_e_grid(originals: torch.Tensor, recon: torch.Tensor, delta_e: np.ndarray, path: Path,
                            count: int = 8) -> Path:
    """The ``count`` images with the largest ΔE: originals in the upper row, reconstructions below, each
    labelled with its ΔE."""
    from latentdit.visualize import save_labeled_grid

    worst = np.argsort(-delta_e, kind="stable")[:count].tolist()
    images = torch.cat([originals[worst], recon[worst].clamp(-1, 1)])
    labels = [f"dE {delta_e[i]:.1f}" for i in worst] * 2
    return save_labeled_grid(images, labels, path, nrow=len(worst))


def print_latent_noise(vae: VAE, originals: torch.Tensor, sigmas: list[float], features, settings,
                       original_features, reference_features=None) -> None:
    """One line per sigma of :func:`noisy_reconstructions`: PSNR, and KID ×1000 against the originals and
    (when given) the reference set, to be read beside the plain reconstruction's line above it. ``features``
    turns images into a metric source, ``settings`` are the run's metric settings."""
    from latentdit.metrics import compute_metrics

    for sigma, images in zip(sigmas, noisy_reconstructions(vae, originals, sigmas)):
        f = features(images)
        line = (f"    latent noise σ {sigma:g}: PSNR {float(psnr(images, originals).mean()):.2f} dB, rKID x1000 "
                f"{1000 * compute_metrics(original_features, f, settings)['kid_mean']:.1f}")
        if reference_features is not None:
            m = compute_metrics(reference_features, f, settings)
            line += f", vs reference KID x1000 {1000 * m['kid_mean']:.1f} ± {1000 * m['kid_std']:.1f}"
        print(line, flush=True)


def main(argv=None) -> int:
    p = make_parser(__doc__.strip().splitlines()[0])
    p.add_argument("--vae", action="append", required=True, help="bundled name or save_pretrained folder (repeatable)")
    p.add_argument("--data", required=True, help="'fashion-mnist' or an image folder")
    p.add_argument("--split", default="train", help="dataset split")
    p.add_argument("--image-size", type=positive_int, default=None, help="default: the VAE card's training size, else 64")
    p.add_argument("--start", type=non_negative_int, default=0,
                   help="first item (Fashion-MNIST); for folders the seed of the random sample")
    p.add_argument("--count", type=positive_int, default=300, help="images to reconstruct")
    p.add_argument("--card-held-out", action="store_true", help="use the held-out images listed in the VAE's model card")
    p.add_argument("--reference-start", type=non_negative_int, default=None,
                   help="also compare with reference images [start, start+count) of the same data and split")
    p.add_argument("--reference-count", type=positive_int, default=500)
    p.add_argument("--reference-split", default=None, help="split of the reference images (default: --split)")
    p.add_argument("--latent-noise", type=non_negative_float, nargs="+", default=[], metavar="SIGMA",
                   help="also decode the latents with Gaussian noise of these stds added (in scaled-latent units)")
    p.add_argument("--batch-size", type=positive_int, default=50, help="images per Inception forward")
    p.add_argument("--update-card", action="store_true", help="write the figures into the (first) VAE's model card")
    p.add_argument("--grid-dir", type=Path, default=None, metavar="DIR",
                   help="write DIR/<vae>-worst-delta-e.png per VAE: the worst-ΔE originals above their reconstructions")
    p.add_argument("--note", default="", help="text added to the model card entry (e.g. the load it was measured under)")
    args = p.parse_args(argv)

    from latentdit.metrics import MetricSettings, compute_metrics, load_source

    first = VAE.load(args.vae[0])
    card_path = (first.folder / BUNDLED_VAE_CARD_JSON) if first.folder is not None else None
    card = read_json(card_path, "model card") if card_path is not None and card_path.is_file() else None
    size = args.image_size or (card["config"]["data"]["image_size"] if card and "config" in card
                               and "data" in card["config"] else 64)
    names = None
    if args.card_held_out:
        if card is None or "held_out_names" not in card:
            raise LatentDiTError(f"--card-held-out: {args.vae[0]} has no model card listing its held-out images")
        names = card["held_out_names"][:args.count]
    originals, what = load_images(args.data, args.split, size, names=names, start=args.start, count=args.count)
    n = originals.shape[0]
    reference = None
    if args.reference_start is not None:
        reference, ref_what = load_images(args.data, args.reference_split or args.split, size, start=args.reference_start,
                                          count=args.reference_count)
    print(f"{what}, {size}x{size}; metrics: PSNR, mean ΔE2000, FID/KID x1000/precision/recall (latentdit.metrics)", flush=True)

    def features(images: torch.Tensor):  # Inception features of each set once (the slow part)
        return load_source(_to_uint8_hwc(images), common)

    common = MetricSettings(batch_size=args.batch_size, progress=False, kid_subset_size=min(1000, n))
    original_features = features(originals)
    rows = []
    if reference is not None:
        reference = features(reference)
        m = compute_metrics(reference, original_features, common)
        rows.append(("original images", None, m, None, None))
    for spec in args.vae:
        vae = VAE.load(spec)
        t0 = time.perf_counter()
        recon = vae.reconstruct(originals)
        seconds = time.perf_counter() - t0
        value = float(psnr(recon, originals).mean())
        delta_e = reconstruction_delta_e(originals, recon)
        if args.grid_dir is not None:
            name = spec.rstrip("/").replace("/", "-").replace("\\", "-")
            grid = save_worst_delta_e_grid(originals, recon, delta_e, args.grid_dir / f"{name}-worst-delta-e.png")
            print(f"    worst-ΔE images: {grid}")
        recon_features = features(recon)
        rfid = compute_metrics(original_features, recon_features, common)
        demo = compute_metrics(reference, recon_features, common) if reference is not None else None
        rows.append((spec, value, rfid, demo, float(delta_e.mean())))
        print(f"{spec}: PSNR {value:.2f} dB, mean ΔE2000 {delta_e.mean():.2f}; rFID {rfid['fid']:.1f}, rKID x1000 {1000 * rfid['kid_mean']:.1f} "
              f"(recon vs the same {n} originals); encode+decode {n / seconds:.1f} img/s", flush=True)
        if demo is not None:
            print(f"    vs reference ({ref_what}): FID {demo['fid']:.1f} / KID x1000 {1000 * demo['kid_mean']:.1f} / "
                  f"precision {demo['precision']:.2f} / recall {demo['recall']:.2f}")
        if args.latent_noise:
            print_latent_noise(vae, originals, args.latent_noise, features, common, original_features, reference)
    if reference is not None:
        m = rows[0][2]
        print(f"original images vs reference: FID {m['fid']:.1f} / KID x1000 {1000 * m['kid_mean']:.1f} / "
              f"precision {m['precision']:.2f} / recall {m['recall']:.2f}")

    if args.update_card:
        if card is None:
            raise LatentDiTError(f"--update-card: {args.vae[0]} has no model_card.json")
        from latentdit.vae.training.card import write_model_card

        command = "python benchmarks/bench_vae.py " + shlex.join(list(argv) if argv is not None else sys.argv[1:])
        command = command.replace(" --update-card", "")
        spec, value, rfid, demo, delta_e_mean = next(r for r in rows if r[0] == args.vae[0])
        text = (f"{what} at {size}x{size}: PSNR {value:.2f} dB, mean ΔE2000 {delta_e_mean:.2f}, rFID {rfid['fid']:.1f}, rKID x1000 "
                f"{1000 * rfid['kid_mean']:.1f} (reconstructions vs the same {n} originals)")
        if demo is not None:
            base = rows[0][2]
            text += (f"; vs {ref_what}: FID {demo['fid']:.1f} / KID x1000 {1000 * demo['kid_mean']:.1f} / "
                     f"precision {demo['precision']:.2f} / recall {demo['recall']:.2f} (the original images: FID "
                     f"{base['fid']:.1f} / KID x1000 {1000 * base['kid_mean']:.1f} / {base['precision']:.2f} / "
                     f"{base['recall']:.2f})")
        for other, v, r, d, e in rows:
            if other not in (args.vae[0], "original images"):
                text += f"; {other}: PSNR {v:.2f} dB, ΔE2000 {e:.2f}, rFID {r['fid']:.1f}, rKID x1000 {1000 * r['kid_mean']:.1f}"
                if d is not None:
                    text += f", vs reference FID {d['fid']:.1f} / KID x1000 {1000 * d['kid_mean']:.1f}"
        if args.note:
            text += f". {args.note}"
        entries = [e for e in card.get("benchmarks", []) if e.get("command") != command]
        card["benchmarks"] = entries + [{"text": text, "command": command, "psnr_db": round(value, 3),
                                         "delta_e2000": round(delta_e_mean, 3), "rfid": rfid["fid"], "images": n}]
        write_model_card(first.folder, card)
        print(f"model card updated: {first.folder}")
    return 0


if __name__ == "__main__":
    run_main(main)

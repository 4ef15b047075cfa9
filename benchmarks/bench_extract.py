"""Latent extraction throughput: tools/extract.py's batched, sharded path vs a per-image baseline.

Both run in the same process on the same folder of images (random 320×288 PNGs, so decoding, the
box/bicubic resize and the center crop run as for real data), for each VAE:

* baseline (how the fast-DiT extract script works): a DataLoader with batch size 1, the diffusers
  model as loaded (default memory format), one ``encode(x).latent_dist.sample()`` call per image,
  one ``np.save`` file per image;
* ours: :func:`latentdit.extraction.extract_latents` at batch sizes 1, 8, 32 — DataLoader workers
  decode, the encoder gets whole batches, moments go to float16 safetensors shards.

VAEs: the bundled KL-f8 (skipped with a message when its weights are not installed) and an
SD-VAE-sized ``AutoencoderKL`` with random weights (block_out_channels 128/256/512/512, 2 layers per
block, 4 latent channels; ≈ 3 s per 256² image on a 2-core CPU, so its counts are small). A row
encodes ``max(N, batch size)`` images. Flip moments are off by default so both sides do the same
encoder work (``--flip`` doubles ours).

Each VAE's encoder FLOPs per image are counted (``torch.utils.flop_counter``), so every row also
shows the FLOP rate it reached as a fraction of the device's matmul peak, measured in the same run:
the baseline's fraction bounds what any extraction of the same FLOPs can gain on that device
(``ceiling`` = peak / baseline FLOP rate).

    python benchmarks/bench_extract.py                     # CPU, a few minutes
    python benchmarks/bench_extract.py --device cuda --sd-images 256 --bundled-images 2048
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from timing import matmul_peak


def make_images(folder: Path, count: int, seed: int = 0) -> Path:
    """``count`` smooth random RGB PNGs (320×288) in one class folder."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    (folder / "class0").mkdir(parents=True, exist_ok=True)
    for i in range(count):
        small = rng.integers(0, 256, (18, 20, 3), dtype=np.uint8)
        Image.fromarray(small).resize((320, 288), Image.BICUBIC).save(folder / "class0" / f"{i:05d}.png")
    return folder


class _PerImage(torch.utils.data.Dataset):
    def __init__(self, files: list[Path], image_size: int):
        self.files, self.image_size = files, image_size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        from PIL import Image

        from latentdit.data.images import array_to_tensor, center_crop_arr

        with Image.open(self.files[i]) as img:
            return array_to_tensor(center_crop_arr(img, self.image_size)), 0


def baseline(vae: Any, folder: Path, out: Path, image_size: int, num_workers: int) -> float:
    """Per-image extraction: batch 1, the plain diffusers model, one encoder call and one ``np.save``
    file per image (latent and label). Returns images/s."""
    files = sorted((folder / "class0").glob("*.png"))
    loader = torch.utils.data.DataLoader(_PerImage(files, image_size), batch_size=1, num_workers=num_workers)
    plain = copy.deepcopy(vae.model).to(memory_format=torch.contiguous_format)  # as from_pretrained gives it
    (out / "features").mkdir(parents=True, exist_ok=True)
    (out / "labels").mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with torch.no_grad():
        for i, (x, y) in enumerate(loader):
            z = plain.encode(x.to(vae.device)).latent_dist.sample().mul_(vae.scaling_factor)
            np.save(out / "features" / f"{i}.npy", z.cpu().numpy())
            np.save(out / "labels" / f"{i}.npy", y.numpy())
    return len(files) / (time.perf_counter() - t0)


def encoder_flops(vae: Any, image_size: int) -> float:
    """FLOPs of encoding one image (convolutions, matmuls, attention)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, 3, image_size, image_size, device=vae.device)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        vae.encode_moments(x)
    return float(counter.get_total_flops())


def ours(vae: Any, folder: Path, out: Path, image_size: int, batch_size: int, num_workers: int, flip: bool) -> float:
    from latentdit.extraction import ExtractionSettings, extract_latents

    report = extract_latents(ExtractionSettings(folder, out, image_size=image_size, batch_size=batch_size,
                                                num_workers=num_workers, flip=flip, dtype="float16",
                                                use_accelerate=False, progress=False, device=vae.device), vae=vae)
    return report.images_per_s


def sd_sized_vae(device: str):
    from diffusers import AutoencoderKL

    from latentdit.vae import VAE

    torch.manual_seed(0)
    model = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                          up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                          layers_per_block=2, latent_channels=4, norm_num_groups=32, sample_size=256,
                          scaling_factor=0.18215)
    return VAE(model.to(device), spec="random SD-VAE-sized AutoencoderKL")


def bench_vae(name: str, vae: Any, args, work: Path) -> list[dict[str, Any]]:
    n = args.sd_images if name.startswith("SD") else args.bundled_images
    counts = sorted({n} | {max(n, b) for b in args.batch_sizes})
    folders = {c: make_images(work / f"images-{c}", c) for c in counts}
    with torch.no_grad():  # warm up kernels outside the timings
        vae.encode_moments(torch.zeros(1, 3, args.image_size, args.image_size, device=vae.device))
    flops = encoder_flops(vae, args.image_size)
    rows = []
    base = baseline(vae, folders[n], work / "baseline", args.image_size, args.num_workers)
    args.peak = max(args.peak, matmul_peak(vae.device, n=args.matmul_size))  # best of before and after each VAE
    rows.append({"vae": name, "method": "per-image baseline", "batch": 1, "images": n, "img_s": base,
                 "flops": flops})
    print(f"  {name}: {flops / 1e9:.1f} GFLOP per image; baseline {base:.2f} img/s = "
          f"{100 * base * flops / args.peak:.0f}% of the matmul peak, so at most "
          f"{args.peak / (base * flops):.1f}x faster at the same FLOPs", flush=True)
    shutil.rmtree(work / "baseline")
    for b in args.batch_sizes:
        c = max(n, b)
        out = work / f"ours-{b}"
        speed = ours(vae, folders[c], out, args.image_size, b, args.num_workers, args.flip)
        shutil.rmtree(out)
        rows.append({"vae": name, "method": "ours" + (" (+flip)" if args.flip else ""), "batch": b, "images": c,
                     "img_s": speed, "ratio": speed / base, "flops": flops * (2 if args.flip else 1)})
        print(f"  {name} batch {b}: {speed:.2f} img/s ({speed / base:.2f}x baseline {base:.2f} img/s)", flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32])
    p.add_argument("--bundled-images", type=int, default=64, help="images per row for the bundled VAE")
    p.add_argument("--sd-images", type=int, default=8, help="images per row for the SD-sized VAE")
    p.add_argument("--num-workers", type=int, default=1)
    p.add_argument("--flip", action="store_true", help="also store flipped moments (2x encoder work for ours)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--skip", choices=["bundled", "sd"], action="append", default=[])
    p.add_argument("--matmul-size", type=int, default=4096, help="n of the n×n matmul that measures the peak")
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args()

    from latentdit.vae import BUNDLED_VAE, VAE

    rows: list[dict[str, Any]] = []
    args.peak = matmul_peak(torch.device(args.device), n=args.matmul_size)
    print(f"matmul peak fp32 {args.peak / 1e9:.0f} GFLOP/s")
    print(f"extraction benchmark: {args.image_size}x{args.image_size}, device {args.device}, "
          f"torch threads {torch.get_num_threads()}, DataLoader workers {args.num_workers}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-extract-") as tmp:
        work = Path(tmp)
        if "bundled" not in args.skip:
            try:
                vae = VAE.load(BUNDLED_VAE, device=args.device)
            except Exception as e:  # not trained/installed yet
                print(f"bundled VAE {BUNDLED_VAE!r} skipped: {e}")
            else:
                rows += bench_vae("bundled KL-f8", vae, args, work / "bundled")
        if "sd" not in args.skip:
            rows += bench_vae("SD-VAE-sized (random)", sd_sized_vae(args.device), args, work / "sd")

    print(f"\n{'VAE':<24} {'method':<20} {'batch':>5} {'images':>6} {'img/s':>9} {'vs baseline':>11} "
          f"{'of peak':>7}  (matmul peak {args.peak / 1e9:.0f} GFLOP/s)")
    for r in rows:
        ratio = f"{r['ratio']:.2f}x" if "ratio" in r else "1.00x"
        util = f"{100 * r['img_s'] * r['flops'] / args.peak:.0f}%"
        print(f"{r['vae']:<24} {r['method']:<20} {r['batch']:>5} {r['images']:>6} {r['img_s']:>9.2f} {ratio:>11} "
              f"{util:>7}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": args.device, "image_size": args.image_size, "peak_flops": args.peak, "rows": rows},
                      f, indent=2)


if __name__ == "__main__":
    main()

"""Build the general-RGB VAE training mix (configs/vae_rgb.yaml) and its unseen evaluation sets.

Sources (Debian packages, installed as root after `apt-get update`):
  sudo apt-get install -y openclipart-png oxygen-icon-theme plasma-workspace-wallpapers ukui-wallpapers \
       lomiri-wallpapers                                   # training mix (train/ + held-out val/)
  sudo apt-get install -y faenza-icon-theme gnome-backgrounds tuxpaint-stamps-default   # never trained on
  python scripts/build_rgb_mix.py --out data/rgb_mix --unseen data/rgb_unseen

Output (--out): an ImageNet-layout folder with split folders, read by tools/train_vae.py as
  train/{clipart,icons,photo}/*.png and val/{clipart,icons,photo}/*.png
  - clipart: every openclipart PNG (duplicates by content removed), alpha composited on white, the
    extraction preprocessing (box halving, bicubic short side, centre crop) to 256x256.
  - icons: the oxygen theme, the largest PNG of each icon (by name), alpha on white, square-padded on
    white when not square, kept at its own size (the reader resizes).
  - photo: seeded random square crops of each high-resolution wallpaper (plasma, ukui, lomiri, Ubuntu
    backgrounds in /usr/share/backgrounds), at several scales (a fraction of the short side), resized
    to 256x256 with a box-then-bicubic filter.
  Held-out rule: whole sources are assigned to val/ by a seeded permutation (clip art by file, icons by
  icon name, wallpapers by wallpaper: every crop of one wallpaper lies on one side). Fractions: --val-fraction.
Output (--unseen): folders never used in training, for evaluation:
  faenza/   the Faenza icon theme, the largest PNG of each icon (symlinked duplicates removed), alpha on white
  gnome_photo/  seeded crops of the gnome-backgrounds wallpapers (as for photo/)
  (tuxpaint stamps are read straight from /usr/share/tuxpaint/stamps.)
Images are read and converted by latentdit.data.images (the reader of extraction and VAE training); the
same seed gives the same files.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import random
import re
from pathlib import Path

from PIL import Image

from latentdit.data.images import center_crop_arr, to_rgb

Image.MAX_IMAGE_PIXELS = 200_000_000
SIZE = 256
PHOTO_EXT = (".jpg", ".jpeg", ".png", ".webp")


def center_crop(pil: Image.Image, size: int) -> Image.Image:
    """The extraction preprocessing (latentdit.data.images): RGB on white, box halving, bicubic short side,
    centre crop; on a square image, a resize to size x size."""
    return Image.fromarray(center_crop_arr(to_rgb(pil), size))


def pad_square_white(pil: Image.Image) -> Image.Image:
    pil = to_rgb(pil)
    w, h = pil.size
    if w == h:
        return pil
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), (255, 255, 255))
    canvas.paste(pil, ((side - w) // 2, (side - h) // 2))
    return canvas


def split_of(keys: list[str], val_fraction: float, seed: int, tag: str) -> set[str]:
    """The keys assigned to val/: a seeded permutation of the sorted unique keys."""
    uniq = sorted(set(keys))
    rng = random.Random(f"{tag}-{seed}")
    rng.shuffle(uniq)
    n_val = max(1, round(len(uniq) * val_fraction))
    return set(uniq[:n_val])


def safe_name(rel: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", rel)


# ------------------------------------------------------------------------------------------- sources


def clipart_files(root: Path) -> list[Path]:
    files, seen = [], set()
    for p in sorted(root.rglob("*.png")):
        digest = hashlib.sha256(p.read_bytes()).hexdigest()
        if digest not in seen:
            seen.add(digest)
            files.append(p)
    return files


def largest_icons(theme: Path) -> dict[str, Path]:
    """icon key (context/name) -> the PNG of the largest pixel size; symlinks resolved and deduplicated."""
    best: dict[str, tuple[int, Path]] = {}
    for p in sorted(theme.rglob("*.png")):
        size_dir = next((part for part in p.relative_to(theme).parts if re.fullmatch(r"\d+(x\d+)?", part)), None)
        if size_dir is None:
            continue
        px = int(size_dir.split("x")[0])
        key = f"{p.parent.name}/{p.stem}"
        if key not in best or px > best[key][0]:
            best[key] = (px, p)
    out, seen_real = {}, set()
    for key in sorted(best):
        real = os.path.realpath(best[key][1])
        if real in seen_real:
            continue
        seen_real.add(real)
        out[key] = best[key][1]
    return out


def wallpaper_groups(plasma: Path, backgrounds: list[Path]) -> dict[str, Path]:
    """wallpaper key -> its largest image file. Plasma: one per package folder (largest in contents/images)."""
    groups: dict[str, Path] = {}
    if plasma.is_dir():
        for folder in sorted(d for d in plasma.iterdir() if d.is_dir()):
            images = [p for p in (folder / "contents" / "images").glob("*") if p.suffix.lower() in PHOTO_EXT]
            if images:
                groups[f"plasma/{folder.name}"] = max(images, key=lambda p: _pixels(p))
    for root in backgrounds:
        for p in sorted(root.glob("*")):
            if p.is_file() and p.suffix.lower() in PHOTO_EXT:
                groups[f"{root.name}/{p.stem}"] = p
    return groups


def gnome_groups(root: Path) -> dict[str, Path]:
    """gnome-backgrounds: light/dark variants (-l/-d) of one wallpaper are one group (largest file)."""
    groups: dict[str, list[Path]] = {}
    for p in sorted(root.glob("*")):
        if p.is_file() and p.suffix.lower() in PHOTO_EXT:
            groups.setdefault(re.sub(r"-[ld]$", "", p.stem), []).append(p)
    return {k: max(v, key=lambda p: _pixels(p)) for k, v in groups.items()}


def _pixels(p: Path) -> int:
    try:
        with Image.open(p) as im:
            return im.size[0] * im.size[1]
    except Exception:
        return 0


def photo_crops(path: Path, n: int, rng: random.Random, scales: tuple[float, ...]) -> list[Image.Image]:
    with Image.open(path) as im:
        im.load()
        pil = to_rgb(im)
    w, h = pil.size
    short = min(w, h)
    crops = []
    for i in range(n):
        side = max(SIZE // 2, int(short * scales[i % len(scales)]))
        side = min(side, short)
        x, y = rng.randint(0, w - side), rng.randint(0, h - side)
        crops.append(center_crop(pil.crop((x, y, x + side, y + side)), SIZE))
    return crops


# ------------------------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="data/rgb_mix")
    ap.add_argument("--unseen", default="data/rgb_unseen", help="'' to skip the unseen sets")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--val-fraction", type=float, default=0.04, help="of clip art files and icon names")
    ap.add_argument("--photo-val-fraction", type=float, default=0.12, help="of wallpapers (whole)")
    ap.add_argument("--crops", type=int, default=48, help="crops per training wallpaper")
    ap.add_argument("--scales", default="1.0,0.5,0.35,0.25,0.18,0.125",
                    help="crop side as a fraction of the wallpaper's short side")
    args = ap.parse_args()
    out = Path(args.out)
    scales = tuple(float(s) for s in args.scales.split(","))
    counts: dict[str, int] = {}

    def save(img: Image.Image, split: str, cls: str, name: str) -> None:
        folder = out / split / cls
        folder.mkdir(parents=True, exist_ok=True)
        img.save(folder / f"{name}.png", optimize=False)
        counts[f"{split}/{cls}"] = counts.get(f"{split}/{cls}", 0) + 1

    # clip art
    clip_root = Path("/usr/share/openclipart/png")
    clips = clipart_files(clip_root)
    rels = [str(p.relative_to(clip_root)) for p in clips]
    val = split_of(rels, args.val_fraction, args.seed, "clipart")
    for p, rel in zip(clips, rels):
        try:
            with Image.open(p) as im:
                img = center_crop(im, SIZE)
        except Exception:  # unreadable files are skipped (and counted)
            counts["skipped"] = counts.get("skipped", 0) + 1
            continue
        save(img, "val" if rel in val else "train", "clipart", safe_name(rel[:-4]))

    # icons (oxygen)
    icons = largest_icons(Path("/usr/share/icons/oxygen"))
    val = split_of(list(icons), args.val_fraction, args.seed, "icons")
    for key, p in icons.items():
        try:
            with Image.open(p) as im:
                img = pad_square_white(im)
        except Exception:
            counts["skipped"] = counts.get("skipped", 0) + 1
            continue
        save(img, "val" if key in val else "train", "icons", safe_name(key))

    # photographs (wallpapers), whole wallpapers on one side
    walls = wallpaper_groups(Path("/usr/share/wallpapers"), [Path("/usr/share/backgrounds")])
    val = split_of(list(walls), args.photo_val_fraction, args.seed, "photo")
    for key, p in walls.items():
        rng = random.Random(f"crops-{args.seed}-{key}")
        split = "val" if key in val else "train"
        n = args.crops if split == "train" else max(8, args.crops // 4)
        try:
            crops = photo_crops(p, n, rng, scales)
        except Exception:
            counts["skipped"] = counts.get("skipped", 0) + 1
            continue
        for i, img in enumerate(crops):
            save(img, split, "photo", f"{safe_name(key)}_{i:03d}")
    (out / "SOURCES.txt").write_text(
        "val wallpapers: " + ", ".join(sorted(val)) + "\ntrain wallpapers: "
        + ", ".join(sorted(set(walls) - val)) + "\n")

    # unseen evaluation sets
    if args.unseen:
        un = Path(args.unseen)
        faenza = largest_icons(Path("/usr/share/icons/Faenza"))
        (un / "faenza").mkdir(parents=True, exist_ok=True)
        for key, p in faenza.items():
            try:
                with Image.open(p) as im:
                    pad_square_white(im).save(un / "faenza" / f"{safe_name(key)}.png")
                counts["unseen/faenza"] = counts.get("unseen/faenza", 0) + 1
            except Exception:
                pass
        gnome = gnome_groups(Path("/usr/share/backgrounds/gnome"))
        (un / "gnome_photo").mkdir(parents=True, exist_ok=True)
        for key, p in gnome.items():
            rng = random.Random(f"crops-{args.seed}-gnome/{key}")
            try:
                crops = photo_crops(p, 16, rng, scales)
            except Exception:
                continue
            for i, img in enumerate(crops):
                img.save(un / "gnome_photo" / f"{safe_name(key)}_{i:03d}.png")
                counts["unseen/gnome_photo"] = counts.get("unseen/gnome_photo", 0) + 1
    for k in sorted(counts):
        print(f"{k}: {counts[k]}")


if __name__ == "__main__":
    main()

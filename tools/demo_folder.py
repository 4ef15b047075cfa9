"""The demo's stages for a user's image folder (``python tools/demo.py --data FOLDER``): the held-out split,
the held-out reference set and the two quality floors. Used by tools/demo.py; no command line of its own.

Output below the demo folder::

    split/<name>/               the training part: symbolic links to the original files, same layout
    split/train.txt             its files (relative paths), one a line
    split/held-out.txt          the held-out files
    split/split.json            the rule, seed, setting and counts per class
    reference/test.npz          the held-out images at the training size (ADM layout, arr_0)
    reference/skipped.json      held-out files that could not be read (skipped and counted)
    floors/real/samples.npz     real training images (a seeded draw, as many as the samples per scale)
    floors/reconstructions/samples.npz   the VAE's reconstructions of those same images
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from latentdit.data import build_image_dataset
from latentdit.data.images import load_image_file
from latentdit.data.split import file_labels, split_held_out, write_file_list
from latentdit.errors import LatentDiTError
from latentdit.io import atomic_path, read_json, write_json
from latentdit.seeding import seed_for

FLOOR_STREAM = "latentdit-demo-floor-images"


def check_folder(demo: Any, stages: list[str], folder_only: tuple[str, ...], batch_size: int) -> None:
    """The folder can be listed, has images, and every class can give up its held-out share; a flat folder
    (one class, no null class) is sampled without guidance. Without a folder: no folder-only stages."""
    folder, out, s = demo.folder, demo.out, demo.s
    if folder is None:
        wrong = [name for name in stages if name in folder_only]
        if wrong:
            raise LatentDiTError(f"demo stage(s) {wrong} belong to an image folder's demo (--data FOLDER)")
        return
    if folder == out or out in folder.parents or folder in out.parents:
        raise LatentDiTError(f"--out {out} and --data {folder} must not contain one another")
    num_train = len(split_held_out(demo.dataset(), s.held_out, s.seed).train)
    if num_train < batch_size:
        raise LatentDiTError(f"--data {folder}: {num_train} training images after the held-out split, fewer than "
                             f"train.global_batch_size={batch_size}; add images or pass a smaller "
                             "train.global_batch_size=N")
    if demo.flat and any(scale != 1.0 for scale in (s.grid_cfg_scale, *s.cfg_scales)):
        raise LatentDiTError(f"--data {folder} is a flat folder (one class): the DiT is trained without labels, so "
                             "there is nothing to guide with; use --cfg-scales 1 --grid-cfg-scale 1")
    if "split" not in stages and {"extract", "reference", "floors"} & set(stages):
        read_list(demo.split_dir / "held-out.txt")


def open_folder(folder: str | os.PathLike, image_size: int):
    """The user's folder as a dataset (flat or ImageNet layout; a root of split folders is entered at train/)."""
    return build_image_dataset(folder, "train", image_size)


def is_flat(dataset: Any) -> bool:
    from latentdit.data.images import FlatFolderDataset

    return isinstance(dataset, FlatFolderDataset)


def training_folder(split_dir: Path, dataset: Any) -> Path:
    """Where the links of the training part live: named like the user's folder (a flat folder's class name)."""
    return split_dir / Path(dataset.root).resolve().name


def write_split(dataset: Any, split_dir: Path, held_out: float | int, seed: int) -> dict[str, Any]:
    """Split, link the training files below :func:`training_folder`, write the lists and split.json.

    Rerunning with the same folder, setting and seed changes nothing; a different split in the same folder
    is refused (the latents and the run made from the old one would no longer fit it)."""
    split = split_held_out(dataset, held_out, seed)
    labels = file_labels(dataset)
    record = {"source": str(Path(dataset.root).resolve()), "layout": "flat" if is_flat(dataset) else "classes",
              **split.to_json(labels)}
    record_file = split_dir / "split.json"
    if record_file.exists():
        old = read_json(record_file, "split record")
        if old != record:
            raise LatentDiTError(f"{record_file} records another split (folder, --held-out, --seed or files "
                                 "changed); use another --out, or delete that folder to start over")
    links = training_folder(split_dir, dataset)
    for name in split.train:
        link = links / name
        if link.is_symlink() or link.exists():
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path(dataset.root).resolve() / name)
    write_file_list(split_dir / "train.txt", split.train)
    write_file_list(split_dir / "held-out.txt", split.held_out)
    write_json(record_file, record)
    return record


def read_list(path: Path) -> list[str]:
    if not path.is_file():
        raise LatentDiTError(f"{path} does not exist; run the 'split' stage first (or the whole demo)")
    return [line for line in path.read_text().splitlines() if line]


def _read_images(root: Path, names: list[str], image_size: int) -> tuple[np.ndarray, list[dict[str, str]]]:
    """uint8 N×H×W×3 of the readable files and ``[{"path", "reason"}]`` of the others."""
    images, skipped = [], []
    for name in names:
        tensor, reason = load_image_file(root / name, image_size)
        if tensor is None:
            skipped.append({"path": name, "reason": reason})
            continue
        images.append(((tensor + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy())
    stacked = np.stack(images) if images else np.zeros((0, image_size, image_size, 3), np.uint8)
    return stacked, skipped


def _save_npz(path: Path, images: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, arr_0=images)


def write_reference(root: Path, split_dir: Path, reference_npz: Path, image_size: int) -> dict[str, Any]:
    """The held-out images as an ADM npz; unreadable ones are skipped and listed in skipped.json."""
    names = read_list(split_dir / "held-out.txt")
    images, skipped = _read_images(root, names, image_size)
    if len(images) < 2:
        raise LatentDiTError(f"only {len(images)} of the {len(names)} held-out images in {root} could be read; "
                             "FID/KID need at least 2 (raise --held-out)")
    _save_npz(reference_npz, images)
    record = {"num_files": len(names), "num_images": len(images), "skipped": skipped}
    write_json(reference_npz.parent / "skipped.json", record)
    return record


def floor_paths(floors_dir: Path) -> dict[str, Path]:
    """The two floor sets by their report name."""
    return {"real training images": floors_dir / "real" / "samples.npz",
            "VAE reconstructions": floors_dir / "reconstructions" / "samples.npz"}


def write_floors(root: Path, split_dir: Path, floors_dir: Path, image_size: int, count: int, seed: int,
                 vae_spec: str, log: Callable[[str], None]) -> dict[str, Any]:
    """Real training images (a seeded draw of ``count``) and the VAE's reconstructions of the same images."""
    from latentdit.vae import VAE

    names = read_list(split_dir / "train.txt")
    generator = torch.Generator().manual_seed(seed_for(FLOOR_STREAM, seed))
    chosen = [names[i] for i in torch.randperm(len(names), generator=generator)[:count].tolist()]
    images, skipped = _read_images(root, chosen, image_size)
    if len(images) < 2:
        raise LatentDiTError(f"only {len(images)} training images in {root} could be read for the floors")
    log(f"reconstructing {len(images)} training images with {vae_spec}")
    vae = VAE.load(vae_spec)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    rec = vae.reconstruct(x)
    rec_u8 = ((rec + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    paths = floor_paths(floors_dir)
    _save_npz(paths["real training images"], images)
    _save_npz(paths["VAE reconstructions"], rec_u8)
    record = {"num_images": len(images), "vae": vae_spec, "skipped": skipped}
    write_json(floors_dir / "floors.json", record)
    return record

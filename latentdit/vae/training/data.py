"""The images a VAE trains on: the training/held-out split, decoded once into a uint8 cache, and the
batch of every step.

Data: whatever ``tools/extract.py --data`` takes (``fashion-mnist``, an ImageNet-layout folder, a flat
folder), read through the same loaders (RGB conversion, alpha composited on white, centre crop to
``data.image_size``). Held-out images come from a ``val/`` split folder when the data has one (for
Fashion-MNIST: its test split), else from a fixed seeded fraction (``data.val_fraction``,
``data.split_seed``) of the training images. Unreadable files are skipped and named in the facts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from latentdit.errors import LatentDiTError
from latentdit.io import load_safetensors, read_json, save_safetensors, sha256_json, write_json
from latentdit.seeding import seed_for
from latentdit.vae.config import VAEConfig

CACHE_FILE = "images.safetensors"
VAL_SPLIT_NAMES = ("val", "valid", "validation")
#: Unreadable files named in the facts (and on the console); the rest are counted.
MAX_NAMED_UNREADABLE = 20


@dataclass
class ImageSplits:
    """Decoded training and held-out images (uint8 ``[N, 3, S, S]``) and where they came from."""

    train: torch.Tensor
    val: torch.Tensor
    val_names: list[str]
    facts: dict[str, Any]

    def unreadable_report(self) -> list[str]:
        """Console lines about the skipped files (none when every file was read)."""
        n = self.facts.get("unreadable", 0)
        if not n:
            return []
        named = self.facts.get("unreadable_files", [])
        lines = [f"skipped {n} unreadable image file(s):"] + [f"  {entry}" for entry in named]
        if n > len(named):
            lines.append(f"  ... {n - len(named)} more")
        return lines


@dataclass
class _Plan:
    """Which items of which datasets form the two splits (before anything is decoded)."""

    train_ds: Any
    val_ds: Any
    train_idx: list[int]
    val_idx: list[int]
    train_names: list[str]
    val_names: list[str]
    how: str


def _val_split_name(source: str) -> str | None:
    from latentdit.data import SPLIT_FOLDERS, is_fashion_mnist

    if is_fashion_mnist(source):
        return "test"
    root = Path(source).expanduser()
    if not root.is_dir():
        return None
    subdirs = {d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")}
    if not subdirs or not subdirs <= SPLIT_FOLDERS:
        return None
    return next((name for name in VAL_SPLIT_NAMES if name in subdirs), None)


def _item_names(dataset: Any, split: str) -> list[str]:
    if hasattr(dataset, "relative_paths"):
        return dataset.relative_paths()
    return [f"{split}[{i}]" for i in range(len(dataset))]


def plan_splits(cfg: VAEConfig) -> _Plan:
    """Open the data and choose the two splits; raises for missing data or an empty split (cheap)."""
    from latentdit.data import build_image_dataset, is_fashion_mnist

    d = cfg.data
    val_split = _val_split_name(d.source)
    train_ds = build_image_dataset(d.source, "train", d.image_size)
    train_names = _item_names(train_ds, "train")
    if val_split is not None:
        val_ds = build_image_dataset(d.source, val_split, d.image_size)
        val_names = _item_names(val_ds, val_split)
        train_idx, val_idx = list(range(len(train_ds))), list(range(len(val_ds)))
        how = "the t10k test split" if is_fashion_mnist(d.source) else f"the {val_split}/ split folder"
    else:
        val_ds = train_ds
        order = torch.randperm(len(train_ds), generator=torch.Generator().manual_seed(
            seed_for("latentdit-vae-holdout", d.split_seed))).tolist()
        n_val = round(len(train_ds) * d.val_fraction)
        if d.val_fraction > 0 and (n_val < 1 or n_val >= len(train_ds)):
            raise LatentDiTError(f"data.val_fraction={d.val_fraction} of {len(train_ds)} images leaves no "
                                 "held-out or no training image; change it or add a val/ split folder")
        val_idx, train_idx = sorted(order[:n_val]), order[n_val:]
        val_names = [train_names[i] for i in val_idx]
        how = f"a seeded random {d.val_fraction:g} of the training images (data.split_seed={d.split_seed})"
    if not val_idx:
        raise LatentDiTError("no held-out images: set data.val_fraction > 0 or add a val/ split folder")
    if d.max_train_images:
        train_idx = train_idx[:d.max_train_images]
    return _Plan(train_ds, val_ds, sorted(train_idx), val_idx, train_names, val_names, how)


class _Decoded(torch.utils.data.Dataset):
    """Items of an image dataset as ``(uint8 3×S×S or None, why it is unreadable or None)``."""

    def __init__(self, dataset: Any, indices: list[int]):
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> tuple[torch.Tensor | None, str | None]:
        index = self.indices[k]
        if hasattr(self.dataset, "load"):  # image folders say why a file is unreadable
            item = self.dataset.load(index)
            image, error = item.image, item.error
        else:
            image, error = self.dataset[index][0], None
        if image is None:
            return None, error or "unreadable image"
        return image.add(1.0).mul_(127.5).round_().clamp_(0, 255).to(torch.uint8), None


def _decode_all(dataset: Any, indices: list[int], names: list[str], num_workers: int, desc: str,
                progress: bool) -> tuple[torch.Tensor, list[int], list[str]]:
    """``(uint8 images, positions in indices that were readable, "name: reason" of the others)``."""
    from tqdm.auto import tqdm

    loader = torch.utils.data.DataLoader(_Decoded(dataset, indices), batch_size=64, num_workers=num_workers,
                                         collate_fn=list)
    images, kept, bad = [], [], []
    position = 0
    for batch in tqdm(loader, desc=desc, unit="batch", disable=not progress or len(indices) < 5000):
        for image, error in batch:
            if image is not None:
                images.append(image)
                kept.append(position)
            else:
                bad.append(f"{names[position]}: {error}")
            position += 1
    if not images:
        raise LatentDiTError(f"data.source: none of the {len(indices)} {desc} images could be read")
    return torch.stack(images), kept, bad


def _cache_key(cfg: VAEConfig, plan: _Plan) -> str:
    from latentdit.data import is_fashion_mnist

    d = cfg.data
    return sha256_json({"source": d.source if is_fashion_mnist(d.source) else str(Path(d.source).expanduser().resolve()),
                        "image_size": d.image_size, "train": sha256_json([plan.train_names[i] for i in plan.train_idx]),
                        "val": sha256_json(plan.val_names)})


def load_splits(cfg: VAEConfig, cache_dir: Path | None = None, plan: _Plan | None = None,
                progress: bool = True) -> ImageSplits:
    """Training and held-out images of ``cfg.data`` (decoded once; cached as ``cache_dir/images.safetensors``).
    ``plan``: the result of :func:`plan_splits` when the caller made it already."""
    plan = plan_splits(cfg) if plan is None else plan
    key = _cache_key(cfg, plan)
    cache = None if cache_dir is None else cache_dir / CACHE_FILE
    if cache is not None and cache.is_file():
        tensors, meta = load_safetensors(cache)
        if meta.get("key") == key:
            facts = read_json(cache.with_suffix(".json"), "image cache facts")
            return ImageSplits(tensors["train"], tensors["val"], facts.pop("val_names"), facts)
    d = cfg.data
    val_names = plan.val_names  # aligned with val_idx
    train, _, bad_train = _decode_all(plan.train_ds, plan.train_idx, [plan.train_names[i] for i in plan.train_idx],
                                      d.num_workers, "train", progress)
    val, kept_val, bad_val = _decode_all(plan.val_ds, plan.val_idx, val_names, d.num_workers, "held-out", progress)
    bad = bad_train + bad_val
    facts = {"data_source": d.source, "holdout": plan.how, "train_images": int(train.shape[0]),
             "val_images": int(val.shape[0]), "unreadable": len(bad), "unreadable_files": bad[:MAX_NAMED_UNREADABLE]}
    names = [val_names[p] for p in kept_val]
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        write_json(cache.with_suffix(".json"), {**facts, "val_names": names})
        save_safetensors({"train": train, "val": val}, cache, {"key": key})
    return ImageSplits(train, val, names, facts)


def to_model_range(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 ``[B, 3, S, S]`` → float32 in ``[-1, 1]``."""
    return images_u8.float().div(127.5).sub(1.0)


def step_generator(cfg: VAEConfig, step: int) -> torch.Generator:
    """The generator of everything random in training step ``step`` (batch, crops, flips, posterior noise)."""
    return torch.Generator().manual_seed(seed_for("latentdit-vae-step", cfg.train.seed, step))


def batch_for_step(images: torch.Tensor, cfg: VAEConfig, g: torch.Generator) -> torch.Tensor:
    """The training batch drawn from ``g``: random images, random crops, random horizontal flips (the
    whole batch of the step; each process trains on its rows, :func:`process_rows`)."""
    b, size, crop = cfg.train.batch_size, images.shape[-1], cfg.data.crop_size
    batch = images[torch.randint(images.shape[0], (b,), generator=g)]
    if crop and crop < size:
        offsets = torch.randint(size - crop + 1, (b, 2), generator=g).tolist()
        batch = torch.stack([im[:, y:y + crop, x:x + crop] for im, (y, x) in zip(batch, offsets)])
    flip = torch.rand(b, generator=g) < 0.5
    batch = torch.where(flip[:, None, None, None], batch.flip(-1), batch)
    return to_model_range(batch)


def process_rows(batch_size: int, rank: int, world: int) -> slice:
    """The rows of a step's batch that process ``rank`` of ``world`` trains on (equal shards)."""
    if batch_size % world:
        raise LatentDiTError(f"train.batch_size={batch_size} is not divisible by the {world} processes; "
                             f"choose a multiple of {world}")
    per = batch_size // world
    return slice(rank * per, (rank + 1) * per)

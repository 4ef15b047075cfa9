"""A seeded held-out split of an image folder, per class, recorded as file lists.

Within each class the files (in the folder's listing order) are put in the order of a permutation drawn
from a generator seeded by ``(seed, class name)``; the first ``k`` of that order are held out. ``k`` is a
count per class, or a fraction of the class rounded to the nearest integer (at least 1). Every class
keeps at least one training image; a class too small for that is refused. The split is a function of
the file list, the held-out setting and the seed only (no file is read), so it is the same on every
machine and rerun, and adding a class leaves the split of the others unchanged.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from latentdit.errors import LatentDiTError
from latentdit.io import atomic_path
from latentdit.seeding import seed_for

SPLIT_STREAM = "latentdit-held-out-split"


def parse_held_out(value: str | float | int) -> float | int:
    """``0 < x < 1``: a fraction of each class; an integer ``>= 1``: a count per class."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise LatentDiTError(f"--held-out: expected a fraction in (0, 1) or a whole number of images per class, "
                             f"got {value!r}") from None
    if 0 < number < 1:
        return number
    if number >= 1 and number == int(number):
        return int(number)
    raise LatentDiTError(f"--held-out: expected a fraction in (0, 1) or a whole number of images per class, "
                         f"got {value!r}")


def held_out_count(num_images: int, held_out: float | int) -> int:
    """Images held out of a class of ``num_images`` under the setting ``held_out``."""
    if isinstance(held_out, int):
        return held_out
    return max(1, round(num_images * held_out))


@dataclass(frozen=True)
class HeldOutSplit:
    """Relative file paths (POSIX form, as :meth:`relative_paths` of the folder datasets give them)."""

    class_names: list[str]
    train: list[str]
    held_out: list[str]
    held_out_setting: float | int
    seed: int

    def per_class(self, labels: dict[str, int]) -> list[dict[str, Any]]:
        """Counts per class: ``[{"class", "train", "held_out"}]`` given each file's label."""
        rows = [{"class": name, "train": 0, "held_out": 0} for name in self.class_names]
        for key, names in (("train", self.train), ("held_out", self.held_out)):
            for name in names:
                rows[labels[name]][key] += 1
        return rows

    def to_json(self, labels: dict[str, int]) -> dict[str, Any]:
        return {"rule": " ".join(__doc__.split("\n\n")[1].split()), "stream": SPLIT_STREAM, "seed": self.seed,
                "held_out_setting": self.held_out_setting, "class_names": self.class_names,
                "per_class": self.per_class(labels), "num_train": len(self.train),
                "num_held_out": len(self.held_out)}


def split_held_out(dataset: Any, held_out: float | int, seed: int) -> HeldOutSplit:
    """Split a folder dataset (:class:`~latentdit.data.images.ImageFolderDataset` or
    :class:`~latentdit.data.images.FlatFolderDataset`) into training and held-out files."""
    names = dataset.relative_paths()
    by_class: dict[int, list[str]] = {}
    for name, label in zip(names, dataset.targets):
        by_class.setdefault(int(label), []).append(name)
    train: list[str] = []
    held: list[str] = []
    for label, class_name in enumerate(dataset.class_names):
        files = by_class.get(label, [])
        k = held_out_count(len(files), held_out)
        if len(files) < k + 1:
            raise LatentDiTError(
                f"class {class_name!r} in {dataset.root} has {len(files)} image(s); holding out {k} "
                f"(--held-out {held_out}) needs at least {k + 1} so that one is left to train on")
        generator = torch.Generator().manual_seed(seed_for(SPLIT_STREAM, seed, class_name))
        order = torch.randperm(len(files), generator=generator).tolist()
        chosen = set(order[:k])
        held.extend(f for i, f in enumerate(files) if i in chosen)
        train.extend(f for i, f in enumerate(files) if i not in chosen)
    return HeldOutSplit(list(dataset.class_names), train, held, held_out, int(seed))


def file_labels(dataset: Any) -> dict[str, int]:
    """Relative path -> label of a folder dataset."""
    return {name: int(label) for name, label in zip(dataset.relative_paths(), dataset.targets)}


def write_file_list(path: str | os.PathLike, names: list[str]) -> None:
    """One relative path per line, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text("".join(f"{name}\n" for name in names))

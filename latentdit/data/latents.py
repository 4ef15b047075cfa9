"""Stored latents: shard naming, the manifest, settings checks, and :class:`LatentDataset` for training.

A latent directory holds ``shard-00000.safetensors``, ``shard-00001.safetensors``, ... and, once every
shard is written, ``manifest.json``. Shard ``k`` holds the items with dataset indices
``[k * shard_size, (k + 1) * shard_size)`` (bad files left out), so the partition does not depend on
the number of extraction processes. Each shard stores the tensors

- ``mean``, ``std``: ``[n, F, C, h, w]`` unscaled posterior moments, ``F = 2`` with the flipped image's
  moments at ``[:, 1]`` (``F = 1`` without flips), in the manifest's ``dtype``;
- ``labels``, ``indices``: int64 ``[n]`` (class label, index of the item in the source dataset);

and in its safetensors metadata the extraction settings (``latentdit_settings``) and its own record
(``latentdit_shard``: index, count, item range, bad files), so a directory without a manifest can still be
checked and resumed.
"""

from __future__ import annotations

import bisect
import functools
import json
import os
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch

from latentdit.errors import LatentDiTError
from latentdit.io import read_json
from latentdit.seeding import seed_for

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SHARD_PREFIX = "shard-"
SHARD_SUFFIX = ".safetensors"
SETTINGS_KEY = "latentdit_settings"
SHARD_KEY = "latentdit_shard"
STORAGE_DTYPES = {"float16": torch.float16, "float32": torch.float32}

#: Settings fields compared when adding to an existing directory, in the order they are checked.
CHECKED_FIELDS = ("format_version", "vae.config_sha256", "vae.weights_sha256", "image_size", "latent_shape",
                  "scaling_factor", "latent_norm", "dtype", "flip", "shard_size", "num_items", "dataset",
                  "preprocessing")


def shard_name(index: int) -> str:
    """File name of shard ``index``."""
    return f"{SHARD_PREFIX}{index:05d}{SHARD_SUFFIX}"


def shard_index_from_name(name: str) -> int | None:
    """Inverse of :func:`shard_name`; None for other file names (temporary files included)."""
    if not (name.startswith(SHARD_PREFIX) and name.endswith(SHARD_SUFFIX)):
        return None
    digits = name[len(SHARD_PREFIX):-len(SHARD_SUFFIX)]
    return int(digits) if digits.isdigit() else None


def list_shards(root: str | os.PathLike) -> dict[int, Path]:
    """Complete shard files in ``root`` by index (temporary files of an interrupted write are not listed)."""
    root = Path(root)
    found = {}
    if root.is_dir():
        for p in root.iterdir():
            k = shard_index_from_name(p.name)
            if k is not None and p.is_file():
                found[k] = p
    return dict(sorted(found.items()))


def num_shards(num_items: int, shard_size: int) -> int:
    return (num_items + shard_size - 1) // shard_size


def shard_range(index: int, shard_size: int, num_items: int) -> tuple[int, int]:
    """Dataset indices ``[start, stop)`` that shard ``index`` covers."""
    return index * shard_size, min((index + 1) * shard_size, num_items)


def read_shard_metadata(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(settings, shard record)`` from a shard's header (no tensor data is read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        return json.loads(meta[SETTINGS_KEY]), json.loads(meta[SHARD_KEY])
    except KeyError as e:
        raise LatentDiTError(f"latent shard {path} has no {e} metadata: it was not written by tools/extract.py") from e
    except Exception as e:  # corrupt or truncated header
        raise LatentDiTError(f"could not read latent shard {path}: {e}. Delete it and run the extraction "
                             "again to rewrite it.") from e


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping) and k == "vae":
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 300 else text[:297] + "..."


def check_settings(old: Mapping[str, Any], new: Mapping[str, Any], where: str) -> None:
    """Raise :class:`LatentDiTError` naming the first differing field, old and new value."""
    old_f, new_f = _flatten(old), _flatten(new)
    for field in CHECKED_FIELDS:
        if old_f.get(field) != new_f.get(field):
            if field == "dataset" and isinstance(old_f.get(field), dict) and isinstance(new_f.get(field), dict):
                keys = sorted(set(old_f[field]) | set(new_f[field]))
                sub = next(k for k in keys if old_f[field].get(k) != new_f[field].get(k))
                field_name, o, n = f"dataset.{sub}", old_f[field].get(sub), new_f[field].get(sub)
            else:
                field_name, o, n = field, old_f.get(field), new_f.get(field)
            extra = ""
            if field.startswith("vae."):
                extra = f" (VAE was {old_f.get('vae.spec')!r}, now {new_f.get('vae.spec')!r})"
            raise LatentDiTError(
                f"{where} was written with a different {field_name}: {_short(o)} (now {_short(n)}){extra}. "
                "Nothing was changed; use another --out directory, or delete that one to start over.")


def read_manifest(root: str | os.PathLike) -> dict[str, Any]:
    """Read and check ``root/manifest.json``."""
    root = Path(root)
    if not root.exists():
        raise LatentDiTError(f"latent directory not found: {root}")
    if not root.is_dir():
        raise LatentDiTError(f"expected a latent directory, but {root} is a file")
    path = root / MANIFEST_NAME
    if not path.is_file():
        shards = list_shards(root)
        if shards:
            raise LatentDiTError(f"no {MANIFEST_NAME} in {root} ({len(shards)} shard files found): the extraction "
                                 "did not finish; run tools/extract.py again with the same arguments to complete it")
        raise LatentDiTError(f"no {MANIFEST_NAME} and no latent shards in {root}: run tools/extract.py first")
    manifest = read_json(path, "latent manifest")
    if not isinstance(manifest, dict) or manifest.get("format") != "latentdit-latents":
        got = "a mapping without format: latentdit-latents" if isinstance(manifest, dict) else type(manifest).__name__
        raise LatentDiTError(f"{path} is not a latentdit latent manifest: expected a JSON object with "
                             f"format: latentdit-latents, got {got}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise LatentDiTError(f"{path} has format_version {manifest.get('format_version')!r}; this version of "
                             f"latentdit reads format_version {FORMAT_VERSION}. Extract the latents again.")
    check_manifest_fields(manifest, path)
    return manifest


def _is_int(v: Any, minimum: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= minimum


#: Fields of a manifest that readers rely on: (name, what is expected, check).
MANIFEST_FIELDS: tuple[tuple[str, str, Any], ...] = (
    ("latent_shape", "a list of 3 positive integers [C, h, w]",
     lambda v: isinstance(v, list) and len(v) == 3 and all(_is_int(x, 1) for x in v)),
    ("num_classes", "a positive integer", lambda v: _is_int(v, 1)),
    ("class_names", "a list of class names (strings)",
     lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v)),
    ("num_items", "an integer >= 0", _is_int),
    ("image_size", "a positive integer", lambda v: _is_int(v, 1)),
    ("scaling_factor", "a positive number",
     lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0),
    ("flip", "true or false", lambda v: isinstance(v, bool)),
    ("dtype", f"one of {', '.join(STORAGE_DTYPES)}", lambda v: v in STORAGE_DTYPES),
    ("vae", "a mapping with the VAE's 'spec'", lambda v: isinstance(v, dict) and isinstance(v.get("spec"), str)),
    ("shards", "a list of {file, count} entries",
     lambda v: isinstance(v, list) and all(isinstance(e, dict) and isinstance(e.get("file"), str)
                                           and _is_int(e.get("count")) for e in v)),
)


def manifest_latent_norm(manifest: Mapping[str, Any], path: str | os.PathLike = MANIFEST_NAME):
    """The :class:`latentdit.data.latent_norm.LatentNorm` of a manifest (scalar ``scaling_factor`` when it records
    none, as every manifest written before per-channel normalisation existed)."""
    from latentdit.data.latent_norm import LatentNorm

    if manifest.get("latent_norm") is None:
        return LatentNorm("scalar", float(manifest["scaling_factor"]))
    return LatentNorm.from_dict(manifest["latent_norm"], f"{path}: field 'latent_norm'")


def check_manifest_fields(manifest: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Raise :class:`LatentDiTError` naming the first missing or ill-typed field of a latent manifest."""
    for name, expected, ok in MANIFEST_FIELDS:
        if name not in manifest:
            raise LatentDiTError(f"{path}: field '{name}' is missing (expected {expected}); the manifest is "
                                 "damaged: extract the latents again")
        if not ok(manifest[name]):
            raise LatentDiTError(f"{path}: field '{name}': expected {expected}, got {_short(manifest[name])}; "
                                 "the manifest is damaged: extract the latents again")
    if manifest["num_classes"] != len(manifest["class_names"]):
        raise LatentDiTError(f"{path}: field 'num_classes' is {manifest['num_classes']} but 'class_names' lists "
                             f"{len(manifest['class_names'])} names; the manifest is damaged: extract the latents "
                             "again")


# ----------------------------------------------------------------------------------------------------------
# Writing a directory: checks against what it holds, the manifest of a complete one


def check_directory(out: Path, settings: Mapping[str, Any]) -> tuple[dict[str, Any] | None, dict[int, Path]]:
    """Compare the extraction ``settings`` with the manifest and every existing shard of ``out``; returns
    ``(manifest or None, complete shards by index)``. Raises on the first difference, touching nothing."""
    manifest = None
    if (out / MANIFEST_NAME).is_file():
        manifest = read_manifest(out)
        recorded = manifest.get("settings")
        if not isinstance(recorded, dict):
            raise LatentDiTError(f"{out / MANIFEST_NAME}: field 'settings': expected the extraction settings (a "
                                 f"mapping), got {type(recorded).__name__}; use another --out directory")
        check_settings(recorded, settings, f"{out / MANIFEST_NAME}")
    shards = list_shards(out)
    expected = num_shards(settings["num_items"], settings["shard_size"])
    for k, path in shards.items():
        old, record = read_shard_metadata(path)
        check_settings(old, settings, str(path))
        if k >= expected or record.get("shard") != k:
            raise LatentDiTError(f"{path} does not belong to an extraction of {settings['num_items']} items in "
                                 f"{expected} shards; use another --out directory")
    return manifest, shards


def remove_temporaries(out: Path, names: Sequence[str]) -> None:
    """Delete temporary files a killed run left for the files ``names`` (see latentdit.io.atomic_path)."""
    for name in names:
        for p in out.glob(f".{name}.*.tmp"):
            p.unlink(missing_ok=True)


def build_manifest(out: str | os.PathLike, settings: Mapping[str, Any]) -> dict[str, Any]:
    """The manifest of a complete directory, built from the shards' own metadata."""
    out = Path(out)
    expected = num_shards(settings["num_items"], settings["shard_size"])
    shards = list_shards(out)
    missing = [shard_name(k) for k in range(expected) if k not in shards]
    if missing:
        raise LatentDiTError(f"cannot write {out / MANIFEST_NAME}: {len(missing)} shards are missing "
                             f"({', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}); run the extraction again")
    entries, bad, total = [], [], 0
    for k in range(expected):
        old, record = read_shard_metadata(shards[k])
        check_settings(old, settings, str(shards[k]))
        entries.append({"file": shard_name(k), "count": int(record["count"]),
                        "start": int(record["start"]), "stop": int(record["stop"])})
        bad.extend(record.get("bad", []))
        total += int(record["count"])
    ds = settings["dataset"]
    return {
        "format": "latentdit-latents",
        "format_version": FORMAT_VERSION,
        "vae": settings["vae"],
        "scaling_factor": settings["scaling_factor"],
        "latent_norm": settings.get("latent_norm"),
        "image_size": settings["image_size"],
        "latent_shape": settings["latent_shape"],
        "dtype": settings["dtype"],
        "flip": settings["flip"],
        "num_items": total,
        "num_classes": len(ds["class_names"]),
        "class_names": ds["class_names"],
        "shard_size": settings["shard_size"],
        "shards": entries,
        "preprocessing": settings["preprocessing"],
        "dataset": ds,
        "num_bad": len(bad),
        "bad_files": bad,
        "tensors": {"mean": "[n, F, C, h, w] unscaled posterior mean; F=2 holds the h-flipped image at [:, 1]",
                    "std": "[n, F, C, h, w] posterior standard deviation", "labels": "int64 [n]",
                    "indices": "int64 [n], index of the item in the source dataset"},
        "settings": settings,
    }


# ----------------------------------------------------------------------------------------------------------
# Reading a directory for training


class LatentDataset(torch.utils.data.Dataset):
    """Stored latents for training: item ``i`` is ``(latent [C, h, w] float32, label long)`` where
    ``latent = normalize(mean + std * noise)`` from the image's or (with probability 1/2 when ``flip``) its
    horizontal flip's stored moments; ``normalize`` is the manifest's latent normalisation
    (:class:`latentdit.data.latent_norm.LatentNorm`: ``× scaling_factor`` unless extracted per channel).

    The noise and flip of item ``i`` come from a generator seeded by ``(seed, epoch, i)``, so an item is a
    pure function of those three (exact resume, any number of processes or workers). Call
    :meth:`set_epoch` each epoch. Shards are opened lazily, memory-mapped, once per process.
    """

    def __init__(self, root: str | os.PathLike, flip: bool = True, seed: int = 0):
        self.root = Path(root)
        self.manifest = read_manifest(self.root)
        m = self.manifest
        self.seed = int(seed)
        self.epoch = 0
        self.stored_flip = bool(m["flip"])
        self.flip = bool(flip) and self.stored_flip
        self.class_names: list[str] = list(m["class_names"])
        self.num_classes: int = int(m["num_classes"])
        self.latent_shape: tuple[int, int, int] = tuple(int(s) for s in m["latent_shape"])
        self.scaling_factor: float = float(m["scaling_factor"])
        self.latent_norm = manifest_latent_norm(m, self.root / MANIFEST_NAME)
        self.image_size: int = int(m["image_size"])
        self.vae: str = str(m["vae"]["spec"])
        shards = m["shards"]
        if not shards or int(m["num_items"]) == 0:
            raise LatentDiTError(f"latent directory {self.root} holds no items (manifest lists "
                                 f"{len(shards)} shards, {m.get('num_items', 0)} items)")
        self._files: list[Path] = []
        counts: list[int] = []
        for entry in shards:
            path = self.root / entry["file"]
            if not path.is_file():
                raise LatentDiTError(f"latent shard {path} listed in {self.root / MANIFEST_NAME} is missing")
            self._files.append(path)
            counts.append(int(entry["count"]))
        self._starts = [0]
        for c in counts:
            self._starts.append(self._starts[-1] + c)
        self._handles: dict[int, Any] = {}
        self._pid = os.getpid()
        self._check_shards(counts)

    def _check_shards(self, counts: list[int]) -> None:
        stored = 2 if self.stored_flip else 1
        for path, count in zip(self._files, counts):
            f = self._open_file(path)
            try:
                shapes = {k: list(f.get_slice(k).get_shape()) for k in ("mean", "std", "labels", "indices")}
            except Exception as e:
                raise LatentDiTError(f"latent shard {path} is corrupt or incomplete ({e})") from e
            want = [count, stored, *self.latent_shape]
            if shapes["mean"] != want or shapes["std"] != want or shapes["labels"] != [count]:
                raise LatentDiTError(f"latent shard {path} has shapes {shapes}, but the manifest expects mean/std "
                                     f"{want} and {count} labels; extract again into a fresh directory")

    @staticmethod
    def _open_file(path: Path):
        from safetensors import safe_open

        if not path.is_file():
            raise LatentDiTError(f"latent shard {path} is missing")
        try:
            return safe_open(str(path), framework="pt")
        except Exception as e:
            raise LatentDiTError(f"latent shard {path} is corrupt or truncated ({e}); extract it again") from e

    def _handle(self, shard: int):
        if self._pid != os.getpid():  # a forked DataLoader worker: open its own handles
            self._handles, self._pid = {}, os.getpid()
        h = self._handles.get(shard)
        if h is None:
            h = self._handles[shard] = self._open_file(self._files[shard])
        return h

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._pid = os.getpid()

    def __len__(self) -> int:
        return self._starts[-1]

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose noise and flips items draw."""
        self.epoch = int(epoch)

    def _locate(self, index: int) -> tuple[int, int]:
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for a LatentDataset of {n} items")
        shard = bisect.bisect_right(self._starts, index) - 1
        return shard, index - self._starts[shard]

    def moments(self, index: int) -> dict[str, torch.Tensor]:
        """Stored tensors of item ``index``: ``mean``/``std`` ``[F, C, h, w]`` (float32), ``label``, ``source_index``."""
        shard, row = self._locate(index)
        f = self._handle(shard)
        try:
            mean = f.get_slice("mean")[row:row + 1][0].float()
            std = f.get_slice("std")[row:row + 1][0].float()
            label = f.get_slice("labels")[row:row + 1][0]
            source = f.get_slice("indices")[row:row + 1][0]
        except Exception as e:
            raise LatentDiTError(f"could not read item {row} of latent shard {self._files[shard]} ({e})") from e
        return {"mean": mean, "std": std, "label": label.long(), "source_index": source.long()}

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.moments(index)
        if index < 0:
            index += len(self)
        g = torch.Generator().manual_seed(seed_for("latentdit-latent-item", int(self.seed), int(self.epoch), int(index)))
        flipped = bool(torch.randint(0, 2, (1,), generator=g).item()) if self.flip else False
        noise = torch.randn(self.latent_shape, generator=g)
        k = 1 if flipped else 0
        latent = self.latent_norm.normalize(m["mean"][k] + m["std"][k] * noise)
        return latent, m["label"]

    @property
    def labels(self) -> torch.Tensor:
        """All labels (int64 ``[len]``), in item order."""
        return torch.cat([self._handle(s).get_tensor("labels") for s in range(len(self._files))]).long()

    @functools.cached_property
    def class_counts(self) -> list[int]:
        """Items per class (index = class id), e.g. to sample labels in the training proportions."""
        return torch.bincount(self.labels, minlength=self.num_classes).tolist()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i in range(len(self)):
            yield self[i]

    def __repr__(self) -> str:
        return (f"LatentDataset({str(self.root)!r}, items={len(self)}, latent_shape={self.latent_shape}, "
                f"classes={self.num_classes}, flip={self.flip}, seed={self.seed}, epoch={self.epoch})")

"""Encode an image dataset into sharded latent moments plus a manifest (the library side of tools/extract.py).

Shard ``k`` always holds dataset items ``[k * shard_size, (k + 1) * shard_size)``; under
``accelerate launch`` process ``r`` of ``W`` writes the shards with ``k % W == r`` and nothing else.
Every shard is written atomically (temporary name, fsync, rename) with the extraction settings in
its metadata, so a killed run is resumed by running the same command again (complete shards are
checked and skipped, left-over temporary files removed), with any number of processes. When all
shards exist the main process writes ``manifest.json``. A directory whose manifest or shards record
another VAE, image size, dataset or layout is refused, and nothing in it is touched.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from latentdit.data.latents import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    SETTINGS_KEY,
    SHARD_KEY,
    STORAGE_DTYPES,
    check_settings,
    list_shards,
    num_shards,
    read_manifest,
    read_shard_metadata,
    shard_name,
    shard_range,
)
from latentdit.distributed import WAIT_FOR_PEERS_TIMEOUT
from latentdit.errors import LatentDiTError
from latentdit.io import check_output_folder, save_safetensors, write_json

FASHION_MNIST_PREPROCESSING = ("Fashion-MNIST 28x28 grey, PIL bicubic resize to image_size, grey repeated to "
                               "RGB, scale to [-1, 1]")


@dataclasses.dataclass
class ExtractionReport:
    """What an extraction did. Counts are over all processes."""

    out: Path
    num_items: int          # items stored in the directory
    num_bad: int            # unreadable files left out
    bad: list[dict[str, Any]]
    num_shards: int
    shards_written: int     # by this run
    shards_skipped: int     # already complete before this run
    items_encoded: int      # by this run (bad files included)
    seconds: float          # wall time of the encoding loop (slowest process)
    bytes: int              # size of the shards and the manifest
    manifest: dict[str, Any] | None
    is_main_process: bool = True  # False on the other processes of a multi-process launch

    @property
    def images_per_s(self) -> float:
        return self.items_encoded / self.seconds if self.seconds > 0 else 0.0

    def format(self, max_bad: int = 20) -> str:
        lines = [f"latents in {self.out}: {self.num_items} items in {self.num_shards} shards "
                 f"({self.shards_written} written now, {self.shards_skipped} already complete), "
                 f"{self.bytes / 2**20:.1f} MiB"]
        if self.items_encoded:
            lines.append(f"encoded {self.items_encoded} images in {self.seconds:.1f} s "
                         f"({self.images_per_s:.1f} images/s)")
        lines.append(f"bad files skipped: {self.num_bad}")
        for entry in self.bad[:max_bad]:
            lines.append(f"  {entry['path']}: {entry['reason']}")
        if self.num_bad > max_bad:
            lines.append(f"  ... {self.num_bad - max_bad} more (see {MANIFEST_NAME})")
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# Reading items for extraction


class _Items(torch.utils.data.Dataset):
    """Dataset items as ``(image or None, label, index, path, error)`` whatever the source's item form."""

    def __init__(self, dataset: Any, name: str):
        self.dataset = dataset
        self.name = name

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | None, int, int, str, str | None]:
        if hasattr(self.dataset, "load"):
            item = self.dataset.load(index)
            return item.image, int(item.label), index, item.path, item.error
        item = self.dataset[index]
        if len(item) == 2:
            image, label = item
            return image, int(label), index, f"{self.name}[{index}]", None
        image, label, _, path = item[:4]
        return image, int(label), index, str(path), None if image is not None else "unreadable image"


def _collate(items: list[tuple]) -> dict[str, Any]:
    good = [it for it in items if it[0] is not None]
    return {
        "images": torch.stack([it[0] for it in good]) if good else None,
        "labels": torch.tensor([it[1] for it in good], dtype=torch.long),
        "indices": torch.tensor([it[2] for it in good], dtype=torch.long),
        "bad": [{"index": it[2], "path": it[3], "reason": it[4] or "unreadable image"}
                for it in items if it[0] is None],
        "count": len(items),
    }


class _ShardBatches(torch.utils.data.Sampler):
    """Batches of dataset indices that never straddle two shards."""

    def __init__(self, shards: Sequence[int], shard_size: int, num_items: int, batch_size: int):
        self.batches = []
        for k in shards:
            start, stop = shard_range(k, shard_size, num_items)
            self.batches.extend(list(range(i, min(i + batch_size, stop))) for i in range(start, stop, batch_size))

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


# ----------------------------------------------------------------------------------------------------------
# Settings, checks, manifest


def _vae_identity(vae: Any) -> dict[str, Any]:
    ident = dict(vae.identity())
    ident.setdefault("spec", str(getattr(vae, "spec", "")))
    return ident


def extraction_settings(vae: Any, dataset_ident: dict[str, Any], *, image_size: int, dtype: str, flip: bool,
                        shard_size: int, num_items: int, limit: int | None, preprocessing: str,
                        latent_norm: str = "scalar") -> dict[str, Any]:
    """The settings stored in every shard and in the manifest; compared when resuming. ``latent_norm``
    ``per-channel`` records the VAE's per-channel statistics (training normalises with them); the default
    scalar normalisation records nothing beyond ``scaling_factor``, as before."""
    factor = int(vae.downsample_factor)
    if image_size % factor:
        raise LatentDiTError(f"--image-size {image_size} is not a multiple of the VAE's downsampling factor {factor}")
    norm = None if latent_norm == "scalar" else vae.latent_norm(latent_norm).to_dict()
    return {
        "latent_norm": norm,
        "format_version": FORMAT_VERSION,
        "vae": _vae_identity(vae),
        "scaling_factor": float(vae.scaling_factor),
        "image_size": int(image_size),
        "latent_shape": [int(vae.latent_channels), image_size // factor, image_size // factor],
        "dtype": dtype,
        "flip": bool(flip),
        "shard_size": int(shard_size),
        "num_items": int(num_items),
        "limit": limit,
        "dataset": dataset_ident,
        "preprocessing": preprocessing,
    }


def _check_existing(out: Path, settings: dict[str, Any]) -> tuple[dict[str, Any] | None, dict[int, Path]]:
    """Compare ``settings`` with the manifest and every existing shard; returns (manifest, shards)."""
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


def _remove_temporaries(out: Path, names: Sequence[str]) -> None:
    """Delete temporary files a killed run left for the files ``names`` (see latentdit.io.atomic_path)."""
    for name in names:
        for p in out.glob(f".{name}.*.tmp"):
            p.unlink(missing_ok=True)


def build_manifest(out: str | os.PathLike, settings: dict[str, Any]) -> dict[str, Any]:
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
# The extraction


def _dist_state(use_accelerate: bool, device: str | torch.device | None):
    """(rank, world size, barrier, all_gather) of the current launch.

    Without a GPU (or with ``device="cpu"``) the processes of ``accelerate launch`` join a gloo group
    (accelerate only does so when asked for CPU). Long timeout: ranks wait for each other at the end.
    """
    if use_accelerate:
        from accelerate import PartialState

        cpu = not torch.cuda.is_available() or (device is not None and torch.device(device).type == "cpu")
        state = PartialState(cpu=cpu, timeout=WAIT_FOR_PEERS_TIMEOUT)
        rank, world = state.process_index, state.num_processes
    else:
        rank, world = 0, 1

    def barrier() -> None:
        if world > 1:
            torch.distributed.barrier()

    def all_gather(obj: Any) -> list[Any]:
        if world == 1:
            return [obj]
        out = [None] * world
        torch.distributed.all_gather_object(out, obj)
        return out

    return rank, world, barrier, all_gather


def _default_device(use_accelerate: bool) -> torch.device:
    if use_accelerate and torch.cuda.is_available():
        from accelerate import PartialState

        return PartialState().device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def extract_latents(
    data: str | os.PathLike,
    out: str | os.PathLike,
    *,
    vae: Any = None,
    split: str = "train",
    image_size: int = 256,
    batch_size: int = 32,
    num_workers: int = 0,
    shard_size: int = 4096,
    flip: bool = True,
    limit: int | None = None,
    dtype: str = "float16",
    device: str | torch.device | None = None,
    vae_dtype: torch.dtype = torch.float32,
    progress: bool = True,
    use_accelerate: bool = True,
    on_shard_written: Callable[[int, Path], None] | None = None,
    latent_norm: str = "scalar",
) -> ExtractionReport:
    """Encode ``data`` (``fashion-mnist`` or an image folder) into ``out``; see the module docstring.

    ``vae`` is a loaded VAE or a spec for ``VAE.load`` (default: the bundled VAE for ``data``, see
    ``latentdit.vae.default_vae_for``); ``latent_norm`` (``scalar`` or ``per-channel``) is recorded
    in the manifest and applied by the training data. ``dtype`` is the storage
    dtype of the moments (``float16`` or ``float32``); ``vae_dtype`` the encoder's compute dtype.
    ``limit`` keeps the first N items. ``on_shard_written(k, path)`` is called after each shard (tests use
    it to simulate a kill). Under ``accelerate launch`` every process must call this with the same arguments.
    """
    from latentdit.data import build_image_dataset, dataset_identity, is_fashion_mnist
    from latentdit.data.images import PREPROCESSING

    if dtype not in STORAGE_DTYPES:
        raise LatentDiTError(f"--dtype must be one of {sorted(STORAGE_DTYPES)}, got {dtype!r}")
    for name, value in (("batch_size", batch_size), ("shard_size", shard_size), ("image_size", image_size)):
        if int(value) < 1:
            raise LatentDiTError(f"{name} must be a positive integer, got {value}")
    if num_workers < 0:
        raise LatentDiTError(f"num_workers must be >= 0, got {num_workers}")
    if limit is not None and limit < 1:
        raise LatentDiTError(f"--limit must be a positive integer, got {limit}")
    out = check_output_folder(out, "--out")

    rank, world, barrier, all_gather = _dist_state(use_accelerate, device)
    is_main = rank == 0
    device = torch.device(device) if device is not None else _default_device(use_accelerate)

    dataset = build_image_dataset(data, split=split, image_size=image_size)
    num_items = len(dataset) if limit is None else min(limit, len(dataset))
    ident = dataset_identity(dataset, data, split)
    preprocessing = FASHION_MNIST_PREPROCESSING if is_fashion_mnist(data) else PREPROCESSING

    if vae is None or isinstance(vae, (str, os.PathLike)):
        from latentdit.vae import VAE, default_vae_for

        if not is_main:  # the main process loads (and, for a hub id, downloads) first
            barrier()
        vae = VAE.load(default_vae_for(data) if vae is None else vae, device=device, dtype=vae_dtype)
        if is_main:
            barrier()
    settings = extraction_settings(vae, ident, image_size=image_size, dtype=dtype, flip=flip, shard_size=shard_size,
                                   num_items=num_items, limit=limit, preprocessing=preprocessing,
                                   latent_norm=latent_norm)
    total_shards = num_shards(num_items, shard_size)

    # Every process checks the same files, so a mismatch stops all of them before any collective call.
    manifest, existing = _check_existing(out, settings)
    mine = [k for k in range(total_shards) if k % world == rank]
    pending = [k for k in mine if k not in existing]
    out.mkdir(parents=True, exist_ok=True)
    _remove_temporaries(out, [shard_name(k) for k in mine] + ([MANIFEST_NAME] if is_main else []))

    start_time = time.perf_counter()
    encoded = _encode_shards(dataset, data, out, vae, settings, pending, device, rank, batch_size=batch_size,
                             num_workers=num_workers, progress=progress and is_main,
                             on_shard_written=on_shard_written)
    seconds = time.perf_counter() - start_time

    barrier()
    gathered = all_gather((encoded, seconds, len(pending)))
    if is_main and (manifest is None or len(existing) < total_shards):
        manifest = build_manifest(out, settings)
        write_json(out / MANIFEST_NAME, manifest)
    barrier()
    if manifest is None:
        manifest = read_manifest(out)

    written = sum(g[2] for g in gathered)
    size = sum(p.stat().st_size for p in list_shards(out).values()) + (out / MANIFEST_NAME).stat().st_size
    return ExtractionReport(out=out, num_items=int(manifest["num_items"]), num_bad=int(manifest["num_bad"]),
                            bad=list(manifest["bad_files"]), num_shards=total_shards, shards_written=written,
                            shards_skipped=total_shards - written, items_encoded=sum(g[0] for g in gathered),
                            seconds=max(g[1] for g in gathered), bytes=size, manifest=manifest,
                            is_main_process=is_main)


def _encode_shards(dataset: Any, data: Any, out: Path, vae: Any, settings: dict[str, Any], pending: list[int],
                   device: torch.device, rank: int, *, batch_size: int, num_workers: int, progress: bool,
                   on_shard_written: Callable[[int, Path], None] | None) -> int:
    """Encode the ``pending`` shards of this process; returns the number of items read."""
    from tqdm.auto import tqdm

    if not pending:
        return 0
    num_items, shard_size = settings["num_items"], settings["shard_size"]
    storage = STORAGE_DTYPES[settings["dtype"]]
    flip = settings["flip"]
    sampler = _ShardBatches(pending, shard_size, num_items, batch_size)
    loader = torch.utils.data.DataLoader(_Items(dataset, str(data)), batch_sampler=sampler, num_workers=num_workers,
                                         collate_fn=_collate, pin_memory=device.type == "cuda")
    total = sum(shard_range(k, shard_size, num_items)[1] - shard_range(k, shard_size, num_items)[0] for k in pending)
    bar = tqdm(total=total, unit="img", desc="extract", disable=not progress, dynamic_ncols=True)
    settings_json = _json(settings)

    queue = list(pending)
    buffers: dict[str, list] = {"mean": [], "std": [], "labels": [], "indices": [], "bad": []}
    seen = 0
    read = 0
    with torch.inference_mode():
        for batch in loader:
            k = queue[0]
            start, stop = shard_range(k, shard_size, num_items)
            if batch["images"] is not None:
                x = batch["images"].to(device, non_blocking=True)
                if flip:
                    x = torch.cat([x, x.flip(-1)])
                mean, std = vae.encode_moments(x)
                mean, std = mean.float(), std.float()
                n = batch["labels"].shape[0]
                if flip:
                    mean = torch.stack([mean[:n], mean[n:]], dim=1)
                    std = torch.stack([std[:n], std[n:]], dim=1)
                else:
                    mean, std = mean.unsqueeze(1), std.unsqueeze(1)
                buffers["mean"].append(mean.to("cpu", storage))
                buffers["std"].append(std.to("cpu", storage))
                buffers["labels"].append(batch["labels"])
                buffers["indices"].append(batch["indices"])
            buffers["bad"].extend(batch["bad"])
            seen += batch["count"]
            read += batch["count"]
            bar.update(batch["count"])
            if seen == stop - start:
                path = _write_shard(out, k, start, stop, buffers, settings, settings_json, storage, rank)
                if on_shard_written is not None:
                    on_shard_written(k, path)
                queue.pop(0)
                buffers = {key: [] for key in buffers}
                seen = 0
    bar.close()
    return read


def _json(obj: Any) -> str:
    import json

    return json.dumps(obj, sort_keys=True)


def _write_shard(out: Path, k: int, start: int, stop: int, buffers: dict[str, list], settings: dict[str, Any],
                 settings_json: str, storage: torch.dtype, rank: int) -> Path:
    c, h, w = settings["latent_shape"]
    frames = 2 if settings["flip"] else 1
    if buffers["mean"]:
        mean, std = torch.cat(buffers["mean"]), torch.cat(buffers["std"])
        labels, indices = torch.cat(buffers["labels"]), torch.cat(buffers["indices"])
    else:  # every file of this shard was unreadable
        mean = std = torch.zeros(0, frames, c, h, w, dtype=storage)
        labels = indices = torch.zeros(0, dtype=torch.long)
    if list(mean.shape[1:]) != [frames, c, h, w]:
        raise LatentDiTError(f"the VAE produced latents of shape {list(mean.shape[2:])}, expected "
                             f"{settings['latent_shape']} for image_size {settings['image_size']}")
    record = {"shard": k, "start": start, "stop": stop, "count": int(labels.shape[0]), "bad": buffers["bad"],
              "process": rank}
    path = out / shard_name(k)
    save_safetensors({"mean": mean, "std": std, "labels": labels, "indices": indices}, path,
                     metadata={SETTINGS_KEY: settings_json, SHARD_KEY: _json(record)})
    return path

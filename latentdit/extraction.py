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
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from latentdit.data import build_image_dataset, dataset_identity, is_fashion_mnist
from latentdit.data.images import PREPROCESSING
from latentdit.data.latent_norm import LATENT_NORMS
from latentdit.data.latents import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    SETTINGS_KEY,
    SHARD_KEY,
    STORAGE_DTYPES,
    build_manifest,
    check_directory,
    list_shards,
    num_shards,
    read_manifest,
    remove_temporaries,
    shard_name,
    shard_range,
)
from latentdit.distributed import WAIT_FOR_PEERS_TIMEOUT
from latentdit.errors import LatentDiTError
from latentdit.io import check_output_folder, save_safetensors, write_json
from latentdit.vae import VAE, default_vae_for

FASHION_MNIST_PREPROCESSING = ("Fashion-MNIST 28x28 grey, PIL bicubic resize to image_size, grey repeated to "
                               "RGB, scale to [-1, 1]")


@dataclasses.dataclass(frozen=True)
class ExtractionSettings:
    """What :func:`extract_latents` encodes, where to and how; checked when constructed.

    ``data``: ``fashion-mnist`` or an image folder, entered at ``split`` (see
    :func:`latentdit.data.build_image_dataset`). ``vae``: a bundled VAE name, a ``save_pretrained``
    folder or a hub id; None for the bundled VAE that fits ``data``. ``latent_norm`` (``scalar`` or
    ``per-channel``) is recorded in the manifest and applied by the training data. ``dtype`` is the
    storage dtype of the moments (``float16`` or ``float32``), ``vae_dtype`` the encoder's compute dtype.
    ``limit`` keeps the first N items. ``device`` None: the process's accelerator, else the CPU.
    ``use_accelerate``: join the processes of an ``accelerate launch`` (each writes its share of shards).
    """

    data: str | os.PathLike
    out: str | os.PathLike
    vae: str | os.PathLike | None = None
    split: str = "train"
    image_size: int = 256
    batch_size: int = 32
    num_workers: int = 0
    shard_size: int = 4096
    flip: bool = True
    limit: int | None = None
    dtype: str = "float16"
    latent_norm: str = "scalar"
    device: str | torch.device | None = None
    vae_dtype: torch.dtype = torch.float32
    progress: bool = True
    use_accelerate: bool = True

    def __post_init__(self) -> None:
        if self.dtype not in STORAGE_DTYPES:
            raise LatentDiTError(f"--dtype must be one of {sorted(STORAGE_DTYPES)}, got {self.dtype!r}")
        if self.latent_norm not in LATENT_NORMS:
            raise LatentDiTError(f"--latent-norm must be one of {', '.join(LATENT_NORMS)}, got {self.latent_norm!r}")
        for name in ("batch_size", "shard_size", "image_size"):
            if int(getattr(self, name)) < 1:
                raise LatentDiTError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.num_workers < 0:
            raise LatentDiTError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.limit is not None and self.limit < 1:
            raise LatentDiTError(f"--limit must be a positive integer, got {self.limit}")


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


def recorded_settings(settings: ExtractionSettings, vae: Any, dataset_ident: dict[str, Any], num_items: int,
                      preprocessing: str) -> dict[str, Any]:
    """The settings stored in every shard and in the manifest (a JSON mapping); compared when resuming.
    ``latent_norm`` ``per-channel`` records the VAE's per-channel statistics (training normalises with
    them); the default scalar normalisation records nothing beyond ``scaling_factor``."""
    image_size = settings.image_size
    factor = int(vae.downsample_factor)
    if image_size % factor:
        raise LatentDiTError(f"--image-size {image_size} is not a multiple of the VAE's downsampling factor {factor}")
    norm = None if settings.latent_norm == "scalar" else vae.latent_norm(settings.latent_norm).to_dict()
    return {
        "latent_norm": norm,
        "format_version": FORMAT_VERSION,
        "vae": _vae_identity(vae),
        "scaling_factor": float(vae.scaling_factor),
        "image_size": int(image_size),
        "latent_shape": [int(vae.latent_channels), image_size // factor, image_size // factor],
        "dtype": settings.dtype,
        "flip": bool(settings.flip),
        "shard_size": int(settings.shard_size),
        "num_items": int(num_items),
        "limit": settings.limit,
        "dataset": dataset_ident,
        "preprocessing": preprocessing,
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


def extract_latents(settings: ExtractionSettings, *, vae: Any = None,
                    on_shard_written: Callable[[int, Path], None] | None = None) -> ExtractionReport:
    """Encode ``settings.data`` into ``settings.out``; see the module docstring.

    ``vae``: an already loaded VAE to encode with, in place of loading ``settings.vae``.
    ``on_shard_written(k, path)`` is called after each shard (tests use it to simulate a kill). Under
    ``accelerate launch`` every process must call this with the same settings.
    """
    s = settings
    out = check_output_folder(s.out, "--out")

    rank, world, barrier, all_gather = _dist_state(s.use_accelerate, s.device)
    is_main = rank == 0
    device = torch.device(s.device) if s.device is not None else _default_device(s.use_accelerate)

    dataset = build_image_dataset(s.data, split=s.split, image_size=s.image_size)
    num_items = len(dataset) if s.limit is None else min(s.limit, len(dataset))
    ident = dataset_identity(dataset, s.data, s.split)
    preprocessing = FASHION_MNIST_PREPROCESSING if is_fashion_mnist(s.data) else PREPROCESSING

    if vae is None:
        if not is_main:  # the main process loads (and, for a hub id, downloads) first
            barrier()
        vae = VAE.load(default_vae_for(s.data) if s.vae is None else s.vae, device=device, dtype=s.vae_dtype)
        if is_main:
            barrier()
    record = recorded_settings(s, vae, ident, num_items, preprocessing)
    total_shards = num_shards(num_items, s.shard_size)

    # Every process checks the same files, so a mismatch stops all of them before any collective call.
    manifest, existing = check_directory(out, record)
    mine = [k for k in range(total_shards) if k % world == rank]
    pending = [k for k in mine if k not in existing]
    out.mkdir(parents=True, exist_ok=True)
    remove_temporaries(out, [shard_name(k) for k in mine] + ([MANIFEST_NAME] if is_main else []))

    start_time = time.perf_counter()
    encoded = _encode_shards(dataset, s, out, vae, record, pending, device, rank, progress=s.progress and is_main,
                             on_shard_written=on_shard_written)
    seconds = time.perf_counter() - start_time

    barrier()
    gathered = all_gather((encoded, seconds, len(pending)))
    if is_main and (manifest is None or len(existing) < total_shards):
        manifest = build_manifest(out, record)
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


def _encode_shards(dataset: Any, s: ExtractionSettings, out: Path, vae: Any, record: dict[str, Any],
                   pending: list[int], device: torch.device, rank: int, *, progress: bool,
                   on_shard_written: Callable[[int, Path], None] | None) -> int:
    """Encode the ``pending`` shards of this process; returns the number of items read."""
    from tqdm.auto import tqdm

    if not pending:
        return 0
    num_items, shard_size = record["num_items"], s.shard_size
    storage = STORAGE_DTYPES[s.dtype]
    flip = s.flip
    sampler = _ShardBatches(pending, shard_size, num_items, s.batch_size)
    loader = torch.utils.data.DataLoader(_Items(dataset, str(s.data)), batch_sampler=sampler,
                                         num_workers=s.num_workers, collate_fn=_collate,
                                         pin_memory=device.type == "cuda")
    total = sum(shard_range(k, shard_size, num_items)[1] - shard_range(k, shard_size, num_items)[0] for k in pending)
    bar = tqdm(total=total, unit="img", desc="extract", disable=not progress, dynamic_ncols=True)
    record_json = _json(record)

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
                path = _write_shard(out, k, start, stop, buffers, record, record_json, storage, rank)
                if on_shard_written is not None:
                    on_shard_written(k, path)
                queue.pop(0)
                buffers = {key: [] for key in buffers}
                seen = 0
    bar.close()
    return read


def _json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True)


def _write_shard(out: Path, k: int, start: int, stop: int, buffers: dict[str, list], record: dict[str, Any],
                 record_json: str, storage: torch.dtype, rank: int) -> Path:
    """Write shard ``k`` atomically with the recorded settings ``record`` and its own record in its metadata."""
    c, h, w = record["latent_shape"]
    frames = 2 if record["flip"] else 1
    if buffers["mean"]:
        mean, std = torch.cat(buffers["mean"]), torch.cat(buffers["std"])
        labels, indices = torch.cat(buffers["labels"]), torch.cat(buffers["indices"])
    else:  # every file of this shard was unreadable
        mean = std = torch.zeros(0, frames, c, h, w, dtype=storage)
        labels = indices = torch.zeros(0, dtype=torch.long)
    if list(mean.shape[1:]) != [frames, c, h, w]:
        raise LatentDiTError(f"the VAE produced latents of shape {list(mean.shape[2:])}, expected "
                             f"{record['latent_shape']} for image_size {record['image_size']}")
    shard = {"shard": k, "start": start, "stop": stop, "count": int(labels.shape[0]), "bad": buffers["bad"],
             "process": rank}
    path = out / shard_name(k)
    save_safetensors({"mean": mean, "std": std, "labels": labels, "indices": indices}, path,
                     metadata={SETTINGS_KEY: record_json, SHARD_KEY: _json(shard)})
    return path

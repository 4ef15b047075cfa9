"""Small file helpers shared by every module: atomic writes, safe loads, hashing.

Files that matter are written atomically: to a temporary name in the same folder, flushed and
fsynced, then renamed over the target, so a crash never leaves a half-written file under the
final name. Files from elsewhere are read with ``torch.load(..., weights_only=True)`` or
safetensors, never by unpickling arbitrary objects.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import stat
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch

from latentdit.distributed import one_line
from latentdit.errors import LatentDiTError, os_error_reason


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[Any]:
    """Open a temporary file beside ``path``; on success fsync it and rename it to ``path``.

    On any exception the temporary file is removed and ``path`` is left untouched.
    """
    with atomic_path(path) as tmp, open(tmp, mode) as f:
        yield f


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` for a writer that wants a file name (not a file object).

    After the block the temporary file is fsynced and renamed to ``path``; on error it is removed.
    Only a regular file (or nothing) is ever replaced: a symbolic link is followed and its target
    written (the temporary file then lies beside the target), and a folder, device, FIFO or socket at
    ``path`` is refused. A full disk, a read-only file system and the like raise :class:`LatentDiTError`.
    """
    target = writable_target(path)
    tmp_path: Path | None = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp_path, _DEFAULT_MODE)
        os.replace(tmp_path, target)
    except BaseException as e:
        if tmp_path is not None:
            with contextlib.suppress(OSError):
                tmp_path.unlink()
        problem = write_failure(e)
        if problem is not None:
            raise LatentDiTError(f"could not write {path}: {problem}") from e
        raise
    fsync_dir(target.parent)


def writable_target(path: str | os.PathLike) -> Path:
    """The file that writing ``path`` replaces: ``path`` itself, or the final target of a symbolic link.

    Raises :class:`LatentDiTError` unless that is a regular file or does not exist yet.
    """
    path = Path(path)
    target = Path(os.path.realpath(path)) if path.is_symlink() else path
    try:
        mode = os.stat(target).st_mode
    except FileNotFoundError:
        return target
    except NotADirectoryError:
        raise LatentDiTError(f"cannot write {path}: a part of the path is a file, not a folder") from None
    if stat.S_ISREG(mode):
        return target
    if stat.S_ISDIR(mode):
        raise LatentDiTError(f"cannot write {path}: it is a folder; expected the path of a file")
    kind = ("a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a FIFO" if stat.S_ISFIFO(mode)
            else "a socket" if stat.S_ISSOCK(mode) else "not a regular file")
    raise LatentDiTError(f"refusing to write {path}: it is {kind}, not a regular file; choose the path of a file")


def check_output_folder(path: str | os.PathLike, what: str) -> Path:
    """Raise :class:`LatentDiTError` (naming ``what``, e.g. ``--out``) unless ``path`` is a folder or could be
    created as one: it must not be a file, nor lie under one."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise LatentDiTError(f"{what} {path} exists and is not a folder; expected a folder (or a path that does "
                             "not exist yet)")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise LatentDiTError(f"{what} {path}: {parent} is a file, not a folder; choose another path")
            break
    return path


#: How a failed write shows in errors that carry no errno: torch's zip writer, safetensors.
_DISK_FULL_TEXTS = ("No space left on device", "StorageFull", "os error 28")
_PARTIAL_WRITE_TEXTS = ("PytorchStreamWriter", "inline_container")


def write_failure(e: BaseException) -> str | None:
    """What went wrong in a failed write that the user can fix (full disk, read-only...), else None."""
    if isinstance(e, OSError):
        return os_error_reason(e)
    text = str(e)
    if any(t in text for t in _DISK_FULL_TEXTS):
        return os_error_reason(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    if isinstance(e, RuntimeError) and any(t in text for t in _PARTIAL_WRITE_TEXTS):
        return (f"the write stopped part-way ({one_line(text)}); the disk is probably full: free some space or "
                "choose another location")
    return None


def _default_mode() -> int:
    """Permissions a plain ``open()`` would give a new file (0666 minus the umask); mkstemp uses 0600."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


#: Read once at import: changing the umask later would race with other threads creating files.
_DEFAULT_MODE = _default_mode()


def fsync_dir(directory: Path) -> None:
    """Flush a folder's entries (a rename into it) to disk; a no-op where the system refuses."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_tree(directory: Path) -> None:
    """Flush the files directly inside ``directory``, then the folder itself."""
    for p in directory.iterdir():
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(directory)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    """Read a JSON file, turning a missing or malformed file into a :class:`LatentDiTError`."""
    path = Path(path)
    if not path.is_file():
        raise LatentDiTError(f"{what} not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except UnicodeDecodeError as e:
        raise LatentDiTError(f"{what} {path} is not UTF-8 text (byte {e.start}); expected a JSON file") from e
    except json.JSONDecodeError as e:
        raise LatentDiTError(f"{what} {path} is not valid JSON ({e}); it may be truncated or hand-edited.") from e


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike,
                     metadata: Mapping[str, str] | None = None) -> None:
    """Save tensors as safetensors, atomically. Tensors are made contiguous (and non-shared)."""
    from safetensors.torch import save_file

    clean = {k: v.detach().contiguous().clone() if _shares_storage(v, tensors) else v.detach().contiguous()
             for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(clean, str(tmp), metadata=dict(metadata) if metadata else None)


def _shares_storage(t: torch.Tensor, tensors: Mapping[str, torch.Tensor]) -> bool:
    ptr = t.untyped_storage().data_ptr()
    return sum(1 for v in tensors.values() if v.untyped_storage().data_ptr() == ptr) > 1


def load_safetensors(path: str | os.PathLike, device: str = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load a safetensors file: returns (tensors, metadata). Errors name the file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise LatentDiTError(f"safetensors file not found: {path}")
    try:
        with safe_open(str(path), framework="pt", device=device) as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises several types for corrupt headers
        raise LatentDiTError(f"could not read safetensors file {path}: {e}") from e
    return tensors, metadata


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata header of a safetensors file (no tensors are read). Errors name the file."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # a corrupt header, not a safetensors file
        raise LatentDiTError(f"could not read safetensors file {path}: {e}") from e


def torch_load(path: str | os.PathLike, what: str = "checkpoint", allowed_globals: Sequence[type] = ()) -> Any:
    """``torch.load`` with ``weights_only=True`` (no arbitrary unpickling), errors naming the file.

    ``allowed_globals``: plain classes (e.g. ``argparse.Namespace``) that this one load may rebuild
    besides tensors and containers; allowed only inside this call, never globally.
    """
    path = Path(path)
    if not path.is_file():
        raise LatentDiTError(f"{what} not found: {path}")
    try:
        with torch.serialization.safe_globals(list(allowed_globals)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        text = str(e)
        if "Weights only load failed" in text:  # torch's long text advises turning the safe mode off: we never do
            refused = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
            reason = ("it is not a PyTorch file of plain tensors and containers, or it holds pickled Python "
                      "objects, which are refused for safety"
                      + (f" (it pickles {refused.group(1)})" if refused else ""))
        else:
            reason = text.strip().splitlines()[0] if text.strip() else type(e).__name__
        raise LatentDiTError(f"could not read {what} {path}: {reason}. Expected a .pt/.pth state dict "
                             "(loaded with weights_only=True) or a .safetensors file.") from e


def torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` atomically."""
    with atomic_write(path, "wb") as f:
        torch.save(obj, f)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    """Hex SHA-256 of a JSON-serialisable object in canonical form (sorted keys)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()

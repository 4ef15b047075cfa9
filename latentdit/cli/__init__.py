"""What every command-line tool shares: the top-level error handler and argument validators.

Tools stay thin: parse arguments, call the library, report. ``run_main(main)`` turns a
:class:`LatentDiTError` into a one-line message on stderr and exit status 2 (the same status
argparse uses for a bad flag), so a user never sees a bare traceback for a mistake they can fix.
File-system refusals (full disk, read-only file system, a folder where a file belongs...) are
reported the same way. Under a launcher only rank 0 prints, and a worker whose launcher dies
stops (see :mod:`latentdit.distributed`).
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path
from typing import Callable, Sequence

from latentdit.distributed import EXIT_USER_ERROR, one_line, rank, report_user_error, watch_launcher
from latentdit.errors import LatentDiTError, ReportedError, describe_os_error


def run_main(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> None:
    """Call ``main(argv)`` and exit: 0 on success, 2 on a user error, 130 on Ctrl-C.

    In a worker of a launcher, the worker also stops (with a message) when its launcher dies.
    """
    watch_launcher()
    try:
        code = main(argv)
    except ReportedError:  # its message is already on the screen
        sys.exit(EXIT_USER_ERROR)
    except LatentDiTError as e:
        report_user_error(str(e))
        sys.exit(EXIT_USER_ERROR)
    except OSError as e:
        message = describe_os_error(e)
        if message is None:
            raise
        report_user_error(message)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line (no usage block), printed like every other user error."""

    def error(self, message: str):
        report_user_error(f"{one_line(message)} (see {self.prog} --help)")
        sys.exit(EXIT_USER_ERROR)


def make_parser(description: str, **kwargs) -> argparse.ArgumentParser:
    """An ``ArgumentParser`` that never guesses abbreviated flags (a typo is an error, not a match) and
    reports a bad flag in one line."""
    return _Parser(description=description, allow_abbrev=False,
                   formatter_class=argparse.ArgumentDefaultsHelpFormatter, **kwargs)


#: A ``section.field=value`` config override (or ``name=value``), as the tools that take overrides accept them.
_OVERRIDE = re.compile(r"^(name|[A-Za-z_]\w*\.[A-Za-z_]\w*)=")


def parse_with_overrides(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """``parser.parse_args`` for a tool whose positional arguments are ``section.field=value`` overrides: they
    may stand anywhere, also right after an option that takes several values (``--only train model.name=X``).
    The overrides are handed to the parser after ``--``, in their order (a misspelt section is then
    reported by the config, not as an unrecognized argument)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = [a for a in argv if _OVERRIDE.match(a)]
    if not overrides:
        return parser.parse_args(argv)
    rest = [a for a in argv if not _OVERRIDE.match(a) and a != "--"]
    return parser.parse_args(rest + ["--", *overrides])


def _int_at_least(text: str, minimum: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a {what} integer, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected a {what} integer (≥ {minimum}), got {value}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer ≥ 1."""
    return _int_at_least(text, 1, "positive")


def non_negative_int(text: str) -> int:
    """argparse type: an integer ≥ 0."""
    return _int_at_least(text, 0, "non-negative")


def finite_float(text: str) -> float:
    """argparse type: a finite real number."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    """argparse type: a finite number ≥ 0 (e.g. a guidance scale)."""
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number ≥ 0, got {value}")
    return value


def existing_path(text: str) -> Path:
    """argparse type: a path that exists (file or folder)."""
    path = Path(text).expanduser()
    if not path.exists():
        raise argparse.ArgumentTypeError(f"no such file or folder: {text}")
    return path


def existing_file(text: str) -> Path:
    """argparse type: an existing regular file."""
    path = existing_path(text)
    if not path.is_file():
        what = "a folder" if path.is_dir() else "not a regular file"
        raise argparse.ArgumentTypeError(f"expected a file, but {text} is {what}")
    return path


def output_file(text: str) -> Path:
    """argparse type: a file to write. Nothing or a regular file may be there (a symbolic link counts as its
    target); a folder, device, FIFO or socket, or a file where one of its folders belongs, is refused now
    rather than after the work."""
    from latentdit.io import writable_target

    path = Path(text).expanduser()
    try:
        writable_target(path)
    except LatentDiTError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return path


def output_folder(text: str) -> Path:
    """argparse type: a folder to write into (existing or not); a file there, or above it, is refused."""
    from latentdit.io import check_output_folder

    try:
        return check_output_folder(Path(text).expanduser(), "output folder")
    except LatentDiTError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def device_arg(text: str) -> str:
    """argparse type for ``--device``: ``auto``, ``cpu``, ``cuda``, ``cuda:1``, ``mps``... that exists here."""
    import torch

    name = text.strip()
    if name == "auto":
        return name
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; expected auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cpu":
        return name
    backend = getattr(torch, device.type, None)
    if device.type == "mps":
        backend = getattr(torch.backends, "mps", None)
    available = getattr(backend, "is_available", None)
    if available is None:
        raise argparse.ArgumentTypeError(f"device {text!r} is not supported; expected auto, cpu, cuda, cuda:N or mps")
    if not available():
        raise argparse.ArgumentTypeError(f"device {text!r} was asked for, but this machine has no usable "
                                         f"{device.type} device; use --device cpu")
    count = getattr(backend, "device_count", None)
    if device.index is not None and count is not None and device.index >= count():
        raise argparse.ArgumentTypeError(f"device {text!r} does not exist: this machine has {count()} "
                                         f"{device.type} device(s), numbered from 0")
    return name


def is_main_process() -> bool:
    """True on the process that should print progress (rank 0, or no distributed launch at all)."""
    return rank() == 0

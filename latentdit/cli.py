"""What every command-line tool shares: the top-level error handler and argument validators.

Tools stay thin: parse arguments, call the library, report. ``run_main(main)`` turns a
:class:`LatentDiTError` into a one-line message on stderr and exit status 2 (the same status
argparse uses for a bad flag), so a user never sees a bare traceback for a mistake they can fix.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

from latentdit.errors import LatentDiTError

EXIT_USER_ERROR = 2


def run_main(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> None:
    """Call ``main(argv)`` and exit: 0 on success, 2 on a user error, 130 on Ctrl-C."""
    try:
        code = main(argv)
    except LatentDiTError as e:
        prog = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "latentdit"
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)


def make_parser(description: str, **kwargs) -> argparse.ArgumentParser:
    """An ``ArgumentParser`` that never guesses abbreviated flags (a typo is an error, not a match)."""
    return argparse.ArgumentParser(description=description, allow_abbrev=False,
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter, **kwargs)


def positive_int(text: str) -> int:
    """argparse type: an integer ≥ 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer (≥ 1), got {value}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer ≥ 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer (≥ 0), got {value}")
    return value


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
        raise argparse.ArgumentTypeError(f"expected a file, but {text} is a folder")
    return path


def is_main_process() -> bool:
    """True on the process that should print progress (rank 0, or no distributed launch at all)."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0

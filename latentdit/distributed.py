"""Processes started by a launcher (``accelerate launch``, ``torchrun``, ``python -m latentdit.launch``).

Two concerns live here:

- **No process left behind.** A worker whose launcher dies (killed, or its terminal closed) is
  re-parented and would otherwise keep running, or wait forever in a collective call for peers
  that are gone. :func:`watch_launcher` (called by :func:`latentdit.cli.run_main` in every tool)
  asks the kernel for a signal when the parent dies (``prctl(PR_SET_PDEATHSIG)``) and starts a
  thread that polls ``getppid()``; either way the worker prints one line and exits. A peer that
  dies while the launcher lives is handled by the launcher, which stops the other workers.
- **One message, exit status 2.** A user error in a worker is printed by rank 0 only and also
  written to the launcher's per-worker error file (``TORCHELASTIC_ERROR_FILE``), so plain
  ``accelerate launch`` shows it in its failure table. ``accelerate launch`` itself still ends with
  its own traceback and exit status 1: it re-raises the worker failure and nothing a worker does
  can change that. :func:`launch_main` (``python -m latentdit.launch``, same arguments as
  ``accelerate launch``) runs accelerate's launcher in this process, prints the first worker's
  message itself (the workers then print none) and exits with status 2.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta
from typing import Sequence

#: Environment variables that only a launcher sets in its workers (torchrun / accelerate's launchers).
LAUNCHER_ENV = ("TORCHELASTIC_RUN_ID", "ACCELERATE_DYNAMO_BACKEND")
#: Set by torchrun (and so by ``accelerate launch --multi_gpu``): where a worker leaves its error message.
ERROR_FILE_ENV = "TORCHELASTIC_ERROR_FILE"
#: Set by :func:`launch_main` for its workers: it prints their messages itself, once.
LAUNCH_PRINTS_ENV = "LATENTDIT_LAUNCH_PRINTS_ERRORS"
#: Seconds between two checks of the parent process.
WATCH_INTERVAL_S = 1.0
#: How long a collective call waits for the other processes where ranks legitimately finish their share at
#: different times (the last barrier of an extraction or a many-sample run: one shard or chunk of imbalance
#: can take hours on a CPU). A peer that dies is noticed at once (gloo) or by the launcher, not by this.
WAIT_FOR_PEERS_TIMEOUT = timedelta(hours=12)
#: Exit status of a worker that stops because its launcher is gone (not a user error).
EXIT_LAUNCHER_GONE = 1
EXIT_USER_ERROR = 2

_PR_SET_PDEATHSIG = 1
_PARENT_DEATH_SIGNAL = signal.SIGUSR1
_watching = False


def rank() -> int:
    """Global rank of this process under a launcher (0 without one)."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))


def launched_by_launcher() -> bool:
    """True in a worker process started by ``accelerate launch``, ``torchrun`` or ``latentdit.launch``."""
    return any(name in os.environ for name in LAUNCHER_ENV)


def program_name() -> str:
    """The running tool's file name, used as the prefix of its messages."""
    return os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "latentdit"


def one_line(text: str) -> str:
    """``text`` with its lines joined: a message the user reads is one line."""
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def report_user_error(message: str) -> None:
    """Print ``prog: error: message`` and leave it in this worker's launcher error file where one is set, so
    the launcher can show it whichever rank failed. With an error file, only rank 0 prints (under
    :func:`launch_main`, none: the launcher prints once); without one (another launcher) every rank
    prints, as a message shown twice beats a rank that fails silently."""
    line = f"{program_name()}: error: {one_line(message)}"
    path = os.environ.get(ERROR_FILE_ENV)
    written = False
    if path:
        try:
            with open(path, "w") as f:
                json.dump({"message": line, "timestamp": int(time.time())}, f)
            written = True
        except OSError:
            pass
    if not written or (rank() == 0 and not os.environ.get(LAUNCH_PRINTS_ENV)):
        print(line, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------
# The worker side: stop when the launcher is gone


def watch_launcher(interval: float = WATCH_INTERVAL_S) -> bool:
    """In a launched worker: exit with a message as soon as the launcher (the parent) dies.

    Returns True if watching (a launched worker), False otherwise (nothing is done). Call it once, from
    the main thread, before any collective call.
    """
    global _watching
    if _watching or not launched_by_launcher():
        return _watching
    parent = os.getppid()
    if threading.current_thread() is threading.main_thread():
        signal.signal(_PARENT_DEATH_SIGNAL, lambda signum, frame: _launcher_gone(parent))
        _set_parent_death_signal(_PARENT_DEATH_SIGNAL)
    if os.getppid() != parent:  # the launcher died before the request above took effect
        _launcher_gone(parent)
    thread = threading.Thread(target=_poll_parent, args=(parent, interval), name="latentdit-launcher-watch",
                              daemon=True)
    thread.start()
    _watching = True
    return True


def _set_parent_death_signal(signum: int) -> None:
    """``prctl(PR_SET_PDEATHSIG, signum)`` on Linux; elsewhere the polling thread alone does the job."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signum), 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _poll_parent(parent: int, interval: float) -> None:
    while True:
        time.sleep(interval)
        if os.getppid() != parent:
            _launcher_gone(parent)


def _launcher_gone(parent: int) -> None:
    print(f"{program_name()}: error: process {rank()} stops: its launcher (process {parent}) has gone away",
          file=sys.stderr, flush=True)
    os._exit(EXIT_LAUNCHER_GONE)


# ----------------------------------------------------------------------------------------------------------
# The launcher side: python -m latentdit.launch


def launch_main(argv: Sequence[str] | None = None) -> int:
    """``accelerate launch`` run in this process, with a worker's user error shown once and exit status 2.

    Takes exactly ``accelerate launch``'s arguments. Returns the exit status: 0, 2 when a worker reported
    a user error, else the failing worker's status (128 + signal number for a signal).
    """
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    parser = launch_command_parser()
    parser.prog = "python -m latentdit.launch"
    args = parser.parse_args(argv)
    args.num_cpu_threads_per_process = cpu_threads_per_process(args)
    _quiet_elastic_agent()
    os.environ[LAUNCH_PRINTS_ENV] = "1"  # inherited by the workers
    try:
        launch_command(args)
    except ChildFailedError as e:
        return _report_failures({r: (f.exitcode, f.message) for r, f in e.failures.items()})
    except subprocess.CalledProcessError as e:  # one process without an error file: it printed its message
        return EXIT_USER_ERROR if e.returncode == EXIT_USER_ERROR else _report_failures({0: (e.returncode, None)})
    except SignalException as e:  # Ctrl-C or a stop signal: the agent has stopped the workers
        print(f"interrupted ({signal.Signals(e.sigval).name})", file=sys.stderr, flush=True)
        return 128 + int(e.sigval)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        return 128 + int(signal.SIGINT)
    return 0


def cpu_threads_per_process(args) -> int | None:
    """Threads for each worker of a launch without a GPU: every core this process may run on, shared evenly
    by the processes of this machine. ``accelerate launch`` itself sets ``OMP_NUM_THREADS=1`` in the workers
    unless ``--cpu`` is passed, which leaves all cores but one idle on a CPU machine. A thread count the user
    gave (``--num_cpu_threads_per_process`` or ``OMP_NUM_THREADS``) is kept, and so is accelerate's default
    when a GPU is present (``None``: accelerate decides)."""
    if args.num_cpu_threads_per_process is not None:
        return args.num_cpu_threads_per_process
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    import torch

    if torch.cuda.is_available() and not args.cpu:
        return None
    local = max(1, int(args.num_processes or 1) // max(1, int(args.num_machines or 1)))
    return max(1, available_cores() // local)


def available_cores() -> int:
    """Cores this process may run on (its affinity mask where the platform has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _quiet_elastic_agent() -> None:
    """Silence the elastic agent's log lines (each worker failure, each stop signal it sends): the workers'
    own output says what went wrong, and :func:`_report_failures` which process failed. Its modules set
    their loggers' levels one by one when imported, so they are imported first."""
    import torch.distributed.elastic.agent.server.api  # noqa: F401
    import torch.distributed.elastic.multiprocessing.api  # noqa: F401
    import torch.distributed.run  # noqa: F401

    for name, logger in list(logging.root.manager.loggerDict.items()):
        if name.startswith(("torch.distributed.elastic", "torch.distributed.launcher", "torch.distributed.run")) \
                and isinstance(logger, logging.Logger):
            logger.setLevel(logging.CRITICAL)


def _report_failures(failures: dict[int, tuple[int, object]]) -> int:
    """Exit status for the failed workers ``{rank: (exit code, error-file message)}`` of a multi-process
    launch; prints the first user error (the workers left it in their error files) or which process failed."""
    user = {r: msg for r, (code, msg) in failures.items() if code == EXIT_USER_ERROR}
    if user:
        rank_, message = min(user.items())
        text = message if isinstance(message, str) and message else (
            f"process {rank_} stopped on a user error (exit status {EXIT_USER_ERROR}) without a message")
        print(one_line(text), file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    rank_, (code, _) = min(failures.items())
    status = 128 - code if code < 0 else code
    how = f"signal {-code}" if code < 0 else f"exit status {code}"
    print(f"latentdit.launch: process {rank_} failed ({how}); its output is above", file=sys.stderr, flush=True)
    return status or 1

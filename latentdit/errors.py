"""The one exception type for problems a user can cause (bad config, missing file, wrong shape...).

Every tool catches it at the top (see :func:`latentdit.cli.run_main`), prints the message to stderr
and exits with status 2. Messages name the thing at fault and what was expected. File-system errors
that the user can fix (a full disk, a read-only file system, a folder where a file belongs...) are
reported the same way; :func:`os_error_reason` says which ones.
"""

from __future__ import annotations

import errno
import os


class LatentDiTError(Exception):
    """A user-facing error: the message alone must tell the user what is wrong and what to do."""


class ReportedError(LatentDiTError):
    """A user error whose one-line message is already on the screen (printed by a tool run as a
    subprocess): the caller exits with status 2 without repeating it."""


#: File-system errors a user causes or can fix (where a path points, the disk, permissions), with what to do.
USER_OS_ERRORS = {
    errno.ENOSPC: "free some space or choose another location",
    errno.EDQUOT: "free some space or choose another location",
    errno.EROFS: "choose a location on a writable file system",
    errno.EACCES: "choose a location you may write to",
    errno.EPERM: "choose a location you may write to",
    errno.EISDIR: "expected a file, but it is a folder",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EEXIST: "it exists and is not a folder",
    errno.ENAMETOOLONG: "choose a shorter path",
    errno.ELOOP: "a symbolic link in the path points back to itself",
}


def os_error_reason(e: BaseException) -> str | None:
    """``"<what the system said> (<what to do>)"`` for a file-system error the user can fix, else None."""
    if not isinstance(e, OSError) or e.errno not in USER_OS_ERRORS:
        return None
    return f"{e.strerror or os.strerror(e.errno)} ({USER_OS_ERRORS[e.errno]})"


def describe_os_error(e: BaseException) -> str | None:
    """A one-line message (path and reason) for a file-system error the user can fix, else None."""
    reason = os_error_reason(e)
    if reason is None:
        return None
    return f"{e.filename if e.filename is not None else 'a file'}: {reason}"

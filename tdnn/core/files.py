"""Writing files atomically: a reader (or a run resumed after a kill) sees the old file or the new one."""

from __future__ import annotations

import contextlib
import glob
import os
import uuid
from collections.abc import Callable


def write_atomic(path: str | os.PathLike[str], write: Callable[[str], None]) -> None:
    """Call ``write(tmp)`` to write a temporary file next to ``path``, then move it into place.

    The file gets the permissions the user's umask gives a new file, is flushed to disk before the
    :func:`os.replace`, and is removed if anything fails, so ``path`` never holds a torn file.

    Raises:
        PermissionError: if ``path`` exists and is read-only (it is not replaced behind your back).
    """
    path = os.fspath(path)
    # the mode bits too: root may write anywhere, but a file marked read-only is not ours to replace
    if os.path.exists(path) and (not os.access(path, os.W_OK) or not os.stat(path).st_mode & 0o222):
        raise PermissionError(f"{path} is read-only; make it writable or write elsewhere")
    directory, base = os.path.split(os.path.abspath(path))
    tmp = os.path.join(directory, f".{base}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with open(tmp, "xb"):  # a new file gets the permissions the user's umask gives
            mode = os.stat(tmp).st_mode
        write(tmp)
        os.chmod(tmp, mode)  # some writers (safetensors) make files private (0600)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def remove_stale(path: str | os.PathLike[str]) -> None:
    """Remove temporary files that :func:`write_atomic` left next to ``path`` when its process was killed."""
    directory, base = os.path.split(os.path.abspath(os.fspath(path)))
    for stale in glob.glob(os.path.join(glob.escape(directory), f".{glob.escape(base)}.*.tmp")):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(stale)

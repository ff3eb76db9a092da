"""Files that are never half written: atomic files and directories (a reader, or a run resumed
after a kill, sees the old one or the new one), and locks that keep two processes apart."""

from __future__ import annotations

import contextlib
import ctypes
import glob
import os
import shutil
import uuid
from collections.abc import Callable

try:
    import fcntl
except ImportError:  # not a POSIX system: Lock does not lock
    fcntl = None


def write_atomic(path: str | os.PathLike[str], write: Callable[[str], None]) -> None:
    """Call ``write(tmp)`` to write a temporary file next to ``path``, then move it into place.

    The file gets the permissions the user's umask gives a new file, is flushed to disk before the
    :func:`os.replace`, and is removed if anything fails, so ``path`` never holds a torn file.

    Raises:
        PermissionError: if ``path`` exists and is read-only (it is not replaced behind your back).
        FileNotFoundError: naming the directory, if it does not exist.
    """
    path = os.fspath(path)
    # the mode bits too: root may write anywhere, but a file marked read-only is not ours to replace
    if os.path.exists(path) and (not os.access(path, os.W_OK) or not os.stat(path).st_mode & 0o222):
        raise PermissionError(f"{path} is read-only; make it writable or write elsewhere")
    directory, base = os.path.split(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"cannot write {path}: the directory {directory} does not exist")
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


def _exchange(a: str, b: str) -> bool:
    """Swap two existing paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); ``False``
    where the system or its file system cannot."""
    libc = ctypes.CDLL(None, use_errno=True)
    if not hasattr(libc, "renameat2"):
        return False
    at_cwd, exchange = -100, 2  # AT_FDCWD, RENAME_EXCHANGE
    return libc.renameat2(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), exchange) == 0


def replace_directory(tmp: str | os.PathLike[str], path: str | os.PathLike[str]) -> None:
    """Put the complete directory ``tmp`` (a sibling of ``path``) in place of ``path``: a reader sees
    the old directory or the new one. Where the system cannot swap two directories atomically, the
    old one is renamed away first (for that instant, ``path`` does not exist; both copies do)."""
    tmp, path = os.fspath(tmp), os.fspath(path)
    if not os.path.lexists(path):
        os.rename(tmp, path)
        return
    if _exchange(tmp, path):
        shutil.rmtree(tmp)  # now the old directory
        return
    old = f"{tmp}.old"
    os.rename(path, old)
    os.rename(tmp, path)
    shutil.rmtree(old)


class Lock:
    """An exclusive lock on ``path`` (an ``fcntl`` lock on a lock file holding the owner's pid), held
    until :meth:`release` or the process ends — a killed holder never leaves it locked. (On a
    system without ``fcntl`` it only records the pid.)

    Raises:
        ValueError: naming the process that holds it, if another one does.
    """

    def __init__(self, path: str | os.PathLike[str], what: str) -> None:
        self.path = os.fspath(path)
        self.file = open(self.path, "a+")  # noqa: SIM115 - held open while locked
        try:
            if fcntl is not None:
                fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            self.file.close()
            raise ValueError(f"{what} is in use by process {holder} (lock file {self.path}); wait for it to "
                               f"finish, or use another directory") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(str(os.getpid()))
        self.file.flush()

    def release(self) -> None:
        if not self.file.closed:
            if fcntl is not None:
                fcntl.flock(self.file, fcntl.LOCK_UN)
            self.file.close()

"""Advisory whole-file locks used to serialise the few critical sections of the store.

flock(2) is used rather than fcntl record locks because record locks belong to the
process (closing any descriptor of the file drops them, and two Store objects in one
process would not exclude each other). On NFS, Linux implements flock with NFS byte-range
locks, so it works across clients; on Lustre the file system must be mounted with
`-o flock` (say so in the docs). A lock held by a process that dies is released by the
kernel (or the NFS lock manager), so a kill -9 never leaves the store locked.
"""
from __future__ import annotations

import errno
import fcntl
import os
import time
from pathlib import Path
from types import TracebackType

from .errors import LockTimeoutError


class FileLock:
    """`with FileLock(path, what="job 'x'"):` holds an exclusive flock on `path`."""

    def __init__(self, path: Path, what: str, timeout: float = 120.0) -> None:
        self.path = path
        self.what = what
        self.timeout = timeout
        self._fd: int | None = None

    def acquire(self, blocking: bool = True) -> bool:
        """Take the lock; with blocking=False return False at once if it is held."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + self.timeout
        delay = 0.001
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self._fd = fd
                return True
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise
            if not blocking:
                os.close(fd)
                return False
            if time.monotonic() > deadline:
                os.close(fd)
                raise LockTimeoutError(
                    f"could not lock {self.what} within {self.timeout:.0f} s (lock file {self.path}): "
                    "another hpcckpt process holds it; if none is running, the file system may not "
                    "support flock (Lustre needs '-o flock')"
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "FileLock":
        self.acquire()
        return self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None) -> None:
        self.release()

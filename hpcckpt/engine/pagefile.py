"""A process's pages file, written run by run while frozen or after the thaw: maybe from a
snapshot copy, maybe staged in memory while the process is frozen and written to the
image afterwards; and the image's files synced together."""
import os
from pathlib import Path

import xxhash

from ..errors import KernelError, ProcessGoneError
from ..images import pb
from ..images.imageset import ImageSet
from ..kernel.libc import libc
from . import memory


class PageFile:
    """One process's pages file, written run by run, maybe from a snapshot copy."""

    def __init__(self, pid: int, iset: ImageSet, pages: pb.Pagemap, stage: bool = False):
        self.pid, self.iset, self.pages = pid, iset, pages
        self.fd = os.open(iset.path / pages.pages_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        self.final_fd = -1
        if stage:   # pages go to memory while frozen, to the image file after the thaw (flush)
            self.final_fd, self.fd = self.fd, os.memfd_create("hpcckpt-stage", os.MFD_CLOEXEC)
        # hashed as written, unless staged (then seal reads the file back, after the thaw)
        self.writer = memory.PageWriter(pid, self.fd, hasher=None if stage else xxhash.xxh3_128())
        self.written: list[tuple[int, int, int]] = []     # (address, bytes, file offset)

    @property
    def source(self) -> int:
        return self.writer.pid

    @source.setter
    def source(self, pid: int) -> None:
        self.writer.close()
        self.writer.mem_fd = -1
        self.writer.pid = pid

    def copy(self, runs, prog) -> None:
        try:
            for k in range(0, len(runs), 4096):   # batched: scattered pages cost few calls
                part = runs[k:k + 4096]
                self.written += [(a, n, off) for (a, n), off in zip(part, self.writer.copy_runs(part))]
                prog(sum(n for _, n in part))
        except OSError as e:
            self._abort()
            if e.errno == 3:
                raise ProcessGoneError(f"process {self.pid} exited during the dump") from None
            raise KernelError(f"writing pages of process {self.pid} to {self.iset.path}: {e.strerror}") from None
        except BaseException:
            self._abort()
            raise

    def close(self, in_parent, sync: bool = True) -> None:
        if self.final_fd < 0:
            try:
                if sync:
                    os.fsync(self.fd)
            finally:
                self._abort()
            if self.writer.hasher is not None:
                self.iset.written[self.pages.pages_file] = pb.FileDigest(
                    size=self.writer.offset, xxh3_128=self.writer.hasher.hexdigest())
        # one sorted pass over plain tuples: sorting the protobuf list costs 10x more
        for addr, n, off in sorted(self.written + [(a, n, -1) for a, n in in_parent]):
            if off < 0:
                self.pages.runs.add(vaddr=addr, nr_pages=n // memory.PAGE_SIZE, in_parent=True)
            else:
                self.pages.runs.add(vaddr=addr, nr_pages=n // memory.PAGE_SIZE, offset=off)
        self.pages.pages_bytes = self.writer.offset
        self.pages.parent_bytes = sum(n for _, n in in_parent)

    def unstage(self) -> None:
        """Staged pages to the image file, and what follows written there directly (the
        few pages copied while frozen before a snapshot's many copied after the thaw:
        no file write in the pause, where writeback of an earlier image can throttle it)."""
        if self.final_fd < 0:
            return
        size, off = self.writer.offset, 0
        hasher = xxhash.xxh3_128()
        try:
            while off < size:
                b = memoryview(os.pread(self.fd, min(memory.CHUNK, size - off), off))
                hasher.update(b)
                w = 0
                while w < len(b):
                    w += os.write(self.final_fd, b[w:])
                off += len(b)
        except OSError as e:
            raise KernelError(f"writing pages of process {self.pid} to {self.iset.path}: {e.strerror}") from None
        os.close(self.fd)
        self.fd, self.final_fd = self.final_fd, -1
        self.writer.fd, self.writer.hasher = self.fd, hasher

    def flush(self) -> None:
        """Staged pages to the image file (sendfile: kernel to kernel), fsynced."""
        if self.final_fd < 0:
            return
        try:
            size, off = self.writer.offset, 0
            while off < size:
                off += os.sendfile(self.final_fd, self.fd, off, size - off)
            os.fsync(self.final_fd)
        except OSError as e:
            raise KernelError(f"writing pages of process {self.pid} to {self.iset.path}: {e.strerror}") from None
        finally:
            self._abort()

    def _abort(self) -> None:
        if self.fd >= 0:
            self.writer.close()
            os.close(self.fd)
            self.fd = -1
        if self.final_fd >= 0:
            os.close(self.final_fd)
            self.final_fd = -1


SYNC_EACH_MAX = 16


def sync_files(path: Path, names: set[str]) -> None:
    """Make what the dump wrote durable before the inventory seals it. A few files are
    fsynced one by one; a tree's hundreds (three per process) with one syncfs() of the
    image's filesystem: an fsync each cost ~1 ms per process here, one syncfs a few ms."""
    dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if len(names) > SYNC_EACH_MAX and libc.syncfs(dfd) == 0:
            return
        for name in sorted(n for n in names if (path / n).is_file()):
            fd = os.open(path / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.fsync(dfd)
    finally:
        os.close(dfd)

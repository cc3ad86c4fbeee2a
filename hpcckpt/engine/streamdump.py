"""Dumping straight into a connection: a migration's pages go to the socket as they are
read from the frozen process, never to a local file, so dump and transfer overlap and the
source needs no disk (or memory) for the pages.

A page file is nothing but the runs its pagemap lists, in order, so its size and every
run's offset are known from the plan before a byte is read. The dump therefore writes
everything else first, in a small local directory: process and pagemap files and the
inventory, whose page-file entries carry the size and an empty digest (not known yet;
such an inventory never verifies as an image on its own). `stream.begin(images, pages)`
sends all of that and announces the page files; then each process's pages are read with
process_vm_readv into one reused buffer, hashed (xxh3-128) and written to the connection,
process after process in the order a restore fills them (the tree's order, so a tree's
restore overlaps the transfer as one process does); `stream.end(digests)` sends the page
files' digests after their bytes, and the destination checks each file against them
before anything runs.

`stream` offers begin(images: Path, pages: list[(name, size)]) -> fd to write the pages
to (a blocking socket), end(digests: dict[name, xxh3-128]), and broken(OSError) -> the
exception to raise when writing to it failed (it may know the destination's reason).
"""
import ctypes
import errno
import os
import queue
import threading

import xxhash

from ..errors import KernelError, ProcessGoneError
from ..images import pb
from ..images.imageset import ImageSet
from . import memory

BATCH = 4096       # runs per copy_runs call: progress is reported between batches
BROKEN = (errno.EPIPE, errno.ECONNRESET, errno.ETIMEDOUT, errno.EAGAIN, errno.ENOTCONN, errno.ECONNABORTED)


class _Pipelined(memory.PageWriter):
    """A PageWriter whose bytes go to the connection from a thread of their own, from one
    of two buffers, while the next chunk is read and hashed into the other: reading the
    frozen process and sending overlap (process_vm_readv and the socket write both run
    without the GIL)."""

    def __post_init__(self):
        super().__post_init__()
        self.bufs = [self.buf, ctypes.create_string_buffer(memory.CHUNK)]
        self.free = [threading.Semaphore(0), threading.Semaphore(1)]   # buffer 0 is being filled
        self.cur = 0
        self.error: OSError | None = None
        self.todo: queue.Queue = queue.Queue()
        self.sender = threading.Thread(target=self._send, daemon=True)
        self.sender.start()

    def _emit(self, view: memoryview) -> None:
        if self.hasher is not None:
            self.hasher.update(view)
        if self.error is not None:
            raise self.error
        self.todo.put((self.cur, view))
        self.cur ^= 1
        self.free[self.cur].acquire()          # the other buffer, once it is sent
        self.buf = self.bufs[self.cur]
        self.addr = ctypes.addressof(self.buf)

    def _send(self) -> None:
        while (item := self.todo.get()) is not None:
            i, view = item
            try:
                w = 0
                while w < len(view) and self.error is None:
                    w += os.write(self.fd, view[w:])
            except OSError as e:
                self.error = e
            finally:
                self.free[i].release()

    def finish(self) -> None:
        """Every byte handed over is sent (or the error that stopped it is raised)."""
        self.todo.put(None)
        self.sender.join()
        if self.error is not None:
            raise self.error


def plan_pagemap(pm: pb.Pagemap, runs: list[tuple[int, int]]) -> int:
    """Fill `pm` with the runs as the page file will hold them (back to back, in order);
    returns the file's size."""
    off = 0
    for addr, n in sorted(runs):
        pm.runs.add(vaddr=addr, nr_pages=n // memory.PAGE_SIZE, offset=off)
        off += n
    pm.pages_bytes = off
    return off


def send(stream, iset: ImageSet, order: list[int], live: list[int], procs: dict[int, pb.Process],
         plans: dict, pagemaps: dict[int, pb.Pagemap], inv: pb.Inventory, prog) -> int:
    """Write the image's metadata to `iset`, send it, then stream every live process's pages;
    returns the bytes of pages sent."""
    runs = {h: sorted(plans[h].write) for h in live}
    sizes = {h: plan_pagemap(pagemaps[h], runs[h]) for h in live}
    for h in order:
        p = procs[h]
        iset.write_message(f"process-{p.pid}.img", "process", p, sync=False)
        iset.write_message(f"pagemap-{p.pid}.img", "pagemap", pagemaps[h], sync=False)
    for h in live:
        inv.digests[pagemaps[h].pages_file].size = sizes[h]    # digest: after the bytes
    iset.seal(inv)       # the metadata's digests, and the page files' sizes
    fd = stream.begin(iset.path, [(pagemaps[h].pages_file, sizes[h]) for h in live])
    digests = {}
    for h in live:
        w = _Pipelined(h, fd)
        w.hasher = xxhash.xxh3_128()
        try:
            try:
                for k in range(0, len(runs[h]), BATCH):
                    part = runs[h][k:k + BATCH]
                    w.copy_runs(part)
                    prog(sum(n for _, n in part))
            finally:
                w.finish()
        except OSError as e:
            if e.errno == errno.ESRCH:
                raise ProcessGoneError(f"process {h} exited during the dump") from None
            if e.errno in BROKEN:
                raise stream.broken(e) from None
            raise KernelError(f"reading the pages of process {h}: {e.strerror}") from None
        finally:
            w.close()
        if w.offset != sizes[h]:      # copy_runs always writes what it was given: a bug if not
            raise KernelError(f"process {h}: {w.offset} bytes of pages sent, {sizes[h]} announced")
        digests[pagemaps[h].pages_file] = w.hasher.hexdigest()
    stream.end(digests)
    prog.finish()
    return sum(sizes.values())

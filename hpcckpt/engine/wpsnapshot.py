"""Live snapshots by synchronous userfaultfd write-protect: no fork, no page-table copy.

While the process is frozen, it makes a userfaultfd (one injected syscall; we keep a copy,
it closes its own), which we register for write-protect (synchronous mode: no WP_ASYNC)
on its writable private anonymous mappings and protect with UFFDIO_WRITEPROTECT. Then it
is thawed. We copy the pages to the image while it runs; a write to a page we have not
copied yet stops the writing thread in a fault we read from the userfaultfd: a server
thread saves that page first (its content is still the frozen instant's), removes the
protection and so wakes the thread. The copier then takes the saved page instead of
reading the changed one. So the image is the state at the freeze, as with a fork, but
the pause holds no page-table copy (fork: 10-31 ms per GiB of 4 KiB pages).

Arming walks every page table entry of the protected memory (~10 ms per GiB of 4 KiB
pages, as much as a fork), so it is done before the freeze (`prearm`): a stop of about
a millisecond to make the userfaultfd, then the mappings whose every page is present
(smaps) are registered and protected while the job runs; a write meanwhile is let
through at once and its page noted, and so are pages an munmap/MADV_DONTNEED/mremap
touches. At the freeze only those pages and the mappings not armed before (new, changed,
sparse ones) are protected: the pause no longer grows with the memory. (A mapping with
never-touched pages is not armed early: a first write there would not fault without
WP_UNPOPULATED, whose markers would fill the page tables of a sparse reservation.)

What the kernel refuses to register in synchronous mode (file-backed private mappings,
shared memory, a mapping another userfaultfd holds, e.g. the async tracker's) is left to
the caller (copied while frozen, or from a fork). If this process dies, its copy of the
userfaultfd is closed: the kernel wakes every blocked writer and drops the protection,
so the job never hangs on us.

While the copy runs, an munmap, mremap or MADV_DONTNEED by the job of memory not yet
copied would take the instant's content with it; those events are enabled (the kernel
reports them; the job waits only until we read them) and such a loss fails the snapshot
(`SnapshotLostError`), never a silently wrong image.
"""
import ctypes
import errno
import fcntl
import os
import select
import struct
import threading
import time
from bisect import bisect_right
from dataclasses import dataclass, field

from ..errors import HpcckptError, KernelError
from ..kernel import proc
from ..kernel.inject import find_syscall_insn
from ..kernel.libc import PAGE_SIZE, vm_read
from ..tracking import userfaultfd as uf
from ..tracking.regions import region
from ..tracking.target import injector
from .freeze import freeze

UFFDIO_WRITEPROTECT = 0xC018AA06
WP_PROTECT = 1
FEATURE_EVENT_REMAP = 1 << 2
FEATURE_EVENT_REMOVE = 1 << 3
FEATURE_EVENT_UNMAP = 1 << 6
FEATURES = FEATURE_EVENT_REMAP | FEATURE_EVENT_REMOVE | FEATURE_EVENT_UNMAP
EVENT_PAGEFAULT, EVENT_REMAP, EVENT_REMOVE, EVENT_UNMAP = 0x12, 0x14, 0x15, 0x16
MSG_SIZE = 32
SLICE = 1 << 20          # the copier holds the lock for one slice: a faulting writer waits <= ~0.2 ms


class SnapshotLostError(HpcckptError):
    """The job unmapped or dropped memory the snapshot had not copied yet."""


def writeprotect(fd: int, start: int, length: int, protect: bool) -> None:
    """UFFDIO_WRITEPROTECT; removing protection also wakes threads waiting on the range."""
    fcntl.ioctl(fd, UFFDIO_WRITEPROTECT, struct.pack("<3Q", start, length, WP_PROTECT if protect else 0))


@dataclass
class WpSnapshot:
    pid: int
    fd: int
    spans: list[tuple[int, int]] = field(default_factory=list)      # registered and protected
    refused: list[tuple[int, int, str]] = field(default_factory=list)
    _runs: list[tuple[int, int]] = field(default_factory=list)     # to copy, sorted
    _starts: list[int] = field(default_factory=list)
    _cursor: int = 0                 # pages of _runs below this address are copied
    _saved: dict[int, bytes] = field(default_factory=dict)
    _lost: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: bool = False
    _copying: bool = False           # False: before the freeze (prearm), faults only noted
    _pre: set[tuple[int, int]] = field(default_factory=set)        # mappings armed before the freeze
    _touched: list[tuple[int, int]] = field(default_factory=list)  # ranges unprotected since
    pause_s: float = 0.0             # the stop `prearm` made to create the userfaultfd
    _thread: threading.Thread | None = None
    _buf: object = None

    # -- before and while frozen -------------------------------------------------------
    @classmethod
    def _open(cls, pid: int, inj) -> "WpSnapshot":
        return cls._with_fd(pid, uf.open_in_target(inj, pid, user_mode_only=False))

    @classmethod
    def _with_fd(cls, pid: int, fd: int) -> "WpSnapshot":
        """The userfaultfd made ready (needs no stop: nothing is registered yet)."""
        try:
            buf = bytearray(struct.pack("<3Q", uf.UFFD_API, FEATURES, 0))
            fcntl.ioctl(fd, uf.UFFDIO_API, buf)
        except OSError as e:
            os.close(fd)
            raise KernelError(f"process {pid}: userfaultfd without write-protect events "
                              f"({e.strerror})") from None
        s = cls(pid, fd)
        s._buf = ctypes.create_string_buffer(PAGE_SIZE)
        return s

    @classmethod
    def prearm(cls, pid: int, vmas: list | None = None) -> "WpSnapshot":
        """Before the freeze: the userfaultfd (one short stop), and the fully populated
        writable private mappings protected while the process runs (see the module).
        `vmas`: its smaps, if read a moment ago."""
        vmas = vmas if vmas is not None else proc.maps(pid)
        ip = find_syscall_insn(pid, vmas)
        t0 = time.monotonic()
        fr = freeze(pid)
        try:                   # the stop: only the syscalls that make the fd and close it there
            with injector(pid, fr, ip) as inj:
                fd = uf.open_in_target(inj, pid, user_mode_only=False)
        finally:
            fr.thaw()
        pause = time.monotonic() - t0
        s = cls._with_fd(pid, fd)
        s.pause_s = pause
        try:
            s._thread = threading.Thread(target=s._loop, name=f"wp-snapshot-{pid}", daemon=True)
            s._thread.start()
            for v in vmas:
                r = region(v)
                if _protectable(r) and v.swap_kb == 0 and v.anon_kb * 1024 == r.end - r.start:
                    with s._lock:         # before an unmap's event can name it (see _message)
                        s._pre.add((r.start, r.end))
                    if s._register(r):
                        writeprotect(s.fd, r.start, r.end - r.start, True)
                    else:
                        s._pre.discard((r.start, r.end))
        except OSError as e:
            s.close()
            raise KernelError(f"UFFDIO_WRITEPROTECT in process {pid}: {e.strerror}") from None
        except BaseException:
            s.close()
            raise
        return s

    @classmethod
    def arm(cls, pid: int, inj, vmas) -> "WpSnapshot":
        """While frozen: make the userfaultfd (`inj`: an Injector in the process) and
        protect every writable private anonymous mapping of `vmas` the kernel accepts.
        KernelError if the kernel has no synchronous write-protect."""
        s = cls._open(pid, inj)
        try:
            s.protect(vmas)
        except BaseException:
            s.close()
            raise
        return s

    def protect(self, vmas) -> None:
        """While frozen: protect what is not (any more): pages written or touched since
        `prearm`, and whole every mapping it did not arm, or that was unmapped or moved
        since (`vmas`: proc.Vma or pb.Vma)."""
        with self._lock:
            self._drain()
            touched = _merged(self._touched)
            self._touched = []
        self.spans = []
        try:
            self._protect(vmas, touched)
        except OSError as e:
            raise KernelError(f"UFFDIO_WRITEPROTECT in process {self.pid}: {e.strerror}") from None

    def _protect(self, vmas, touched: list[tuple[int, int]]) -> None:
        for v in vmas:
            r = region(v)
            if not _protectable(r):
                continue
            if (r.start, r.end) in self._pre:
                i = max(bisect_right(touched, (r.start, 0)) - 1, 0)
                for a, b in touched[i:]:
                    lo, hi = max(a, r.start), min(b, r.end)
                    if a >= r.end:
                        break
                    if lo < hi:
                        writeprotect(self.fd, lo, hi - lo, True)
            elif self._register(r):
                writeprotect(self.fd, r.start, r.end - r.start, True)
            else:
                continue
            self.spans.append((r.start, r.end))

    def _register(self, r) -> bool:
        try:
            uf.register_wp(self.fd, r.start, r.end - r.start)
            return True
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.EBUSY, errno.EPERM):
                raise KernelError(f"UFFDIO_REGISTER for process {self.pid}: {e.strerror}") from None
            self.refused.append((r.start, r.end, e.strerror))
            return False

    def _drain(self) -> None:
        """Messages already queued, handled now (lock held; the process is frozen)."""
        while True:
            try:
                data = os.read(self.fd, MSG_SIZE * 64)
            except (BlockingIOError, OSError):
                return
            for k in range(0, len(data), MSG_SIZE):
                self._message(data[k:k + MSG_SIZE])

    def covers(self, addr: int) -> bool:
        i = bisect_right(self.spans, (addr, 1 << 64)) - 1
        return i >= 0 and self.spans[i][0] <= addr < self.spans[i][1]

    def split(self, runs: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """Keeps the runs inside protected mappings (copied after the thaw); returns the
        others (to be copied now, while frozen)."""
        later, now = [], []
        for r in runs:
            (later if self.covers(r[0]) else now).append(r)
        with self._lock:
            self._runs = sorted(later)
            self._starts = [a for a, _ in self._runs]
            self._cursor = self._runs[0][0] if self._runs else 1 << 64
            self._copying = True
        return now

    # -- after the thaw ----------------------------------------------------------------
    def serve(self) -> None:
        """Start answering write faults (the thread that saves pages before they change)."""
        if self._thread is not None:
            return        # started by prearm
        self._thread = threading.Thread(target=self._loop, name=f"wp-snapshot-{self.pid}", daemon=True)
        self._thread.start()

    def _pending(self, addr: int) -> bool:
        """Whether the page at `addr` is to be copied and not yet copied (lock held)."""
        if addr < self._cursor:
            return False
        i = bisect_right(self._starts, addr) - 1
        return i >= 0 and addr < self._runs[i][0] + self._runs[i][1]

    def _loop(self) -> None:
        poll = select.poll()
        poll.register(self.fd, select.POLLIN)
        while not self._stop:
            if not poll.poll(50):
                continue
            with self._lock:      # read and handled as one step: see protect()
                try:
                    data = os.read(self.fd, MSG_SIZE * 64)
                except BlockingIOError:
                    continue
                except OSError:
                    return
                for k in range(0, len(data), MSG_SIZE):
                    self._message(data[k:k + MSG_SIZE])

    def _message(self, msg: bytes) -> None:
        """One message from the userfaultfd (lock held)."""
        event = msg[0]
        a, b, c = struct.unpack_from("<3Q", msg, 8)
        if not self._copying:
            # before the freeze: let the write through, note the page (protected again then)
            page = b & ~(PAGE_SIZE - 1)
            rng = {EVENT_PAGEFAULT: (page, page + PAGE_SIZE), EVENT_REMAP: (b, b + c)}.get(event, (a, b))
            self._touched.append(rng)
            if event in (EVENT_UNMAP, EVENT_REMAP):
                # what is mapped there at the freeze is not (all) the mapping armed:
                # registered and protected whole then, even if it looks the same
                gone = [rng] + ([(a, a + c)] if event == EVENT_REMAP else [])
                self._pre = {m for m in self._pre if not any(m[0] < hi and lo < m[1] for lo, hi in gone)}
            if event == EVENT_PAGEFAULT:
                try:
                    writeprotect(self.fd, page, PAGE_SIZE, False)
                except OSError:
                    pass
            return
        if event == EVENT_PAGEFAULT:
            page = b & ~(PAGE_SIZE - 1)
            try:
                if self._pending(page) and page not in self._saved:
                    self._saved[page] = self._read(page)
            except (OSError, HpcckptError) as e:     # the copier must not take the new content
                self._lost.append(f"{page:#x} could not be saved before it was written ({e})")
            finally:
                try:
                    writeprotect(self.fd, page, PAGE_SIZE, False)    # wakes the writer
                except OSError:
                    pass      # unmapped meanwhile: the event for it says whether it mattered
        elif event in (EVENT_REMOVE, EVENT_UNMAP):   # arg: start, end
            self._check_gone(a, b, "unmapped" if event == EVENT_UNMAP else "dropped (MADV_DONTNEED/REMOVE)")
        elif event == EVENT_REMAP:                   # arg: from, to, len
            self._check_gone(a, a + c, f"moved by mremap to {b:#x}")

    def _check_gone(self, start: int, end: int, what: str) -> None:
        i = max(bisect_right(self._starts, start) - 1, 0)
        for addr, n in self._runs[i:]:
            if addr >= end:
                break
            lo, hi = max(addr, start, self._cursor), min(addr + n, end)
            if any(p not in self._saved for p in range(lo, hi, PAGE_SIZE)):
                self._lost.append(f"{lo:#x}-{hi:#x} {what}")
                return

    def _read(self, page: int) -> bytes:
        got = vm_read(self.pid, ctypes.addressof(self._buf), page, PAGE_SIZE)
        if got != PAGE_SIZE:
            raise KernelError(f"process {self.pid}: cannot read page {page:#x} for the snapshot")
        return self._buf.raw[:PAGE_SIZE]

    def copy(self, page_file, prog) -> None:
        """Copy the runs given to `serve` into `page_file` (engine.pagefile.PageFile), slice
        by slice, each slice's pages either read now (still protected: the instant's) or
        saved by a fault; then the slice's protection is removed (later writes there
        cost the job nothing)."""
        w = page_file.writer
        for piece in _slices(self._runs):
            with self._lock:
                self._check_lost()
                batch = []
                for addr, n in _around(piece, self._saved):
                    if n > 0:
                        batch.append((addr, n))
                        continue
                    page_file.copy(batch, _quiet)      # a saved page: what precedes it first
                    batch = []
                    off = w.offset
                    w._emit(memoryview(self._saved.pop(addr)))
                    w.offset += PAGE_SIZE
                    page_file.written.append((addr, PAGE_SIZE, off))
                page_file.copy(batch, _quiet)
                last = piece[-1]
                self._cursor = last[0] + last[1]
            lo, hi = piece[0][0], last[0] + last[1]
            for s, e in self.spans:
                if s < hi and e > lo:
                    try:
                        writeprotect(self.fd, max(s, lo), min(e, hi) - max(s, lo), False)
                    except OSError:
                        pass       # part of it unmapped meanwhile: checked by the events
            prog(sum(n for _, n in piece))
        with self._lock:
            self._check_lost()

    def _check_lost(self) -> None:
        if self._lost:
            raise SnapshotLostError(
                f"process {self.pid} changed its memory layout during the live snapshot "
                f"before it was copied ({'; '.join(self._lost[:3])}): the image would not be "
                "one instant; take it again (or with --live-route fork)")

    def close(self) -> None:
        """Stop serving and close the userfaultfd: the kernel drops the protection left and
        wakes any thread still waiting."""
        self._stop = True
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _merged(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, disjoint: touching or overlapping ranges joined."""
    out: list[tuple[int, int]] = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _protectable(r) -> bool:
    return not r.shared and not r.special and bool(r.prot & 2)


def _quiet(n: int) -> None:
    pass


def _slices(runs: list[tuple[int, int]]):
    """Runs cut into pieces of at most SLICE bytes (a big run is cut too)."""
    piece, size = [], 0
    for addr, n in runs:
        while n > 0:
            k = min(n, SLICE - size)
            piece.append((addr, k))
            addr, n, size = addr + k, n - k, size + k
            if size == SLICE:
                yield piece
                piece, size = [], 0
    if piece:
        yield piece


def _around(piece: list[tuple[int, int]], saved: dict[int, bytes]):
    """The piece's runs with saved pages cut out as (address, -1) entries, in order."""
    if not saved:
        yield from piece
        return
    for addr, n in piece:
        start = addr
        for p in range(addr, addr + n, PAGE_SIZE):
            if p in saved:
                if p > start:
                    yield start, p - start
                yield p, -1
                start = p + PAGE_SIZE
        if start < addr + n:
            yield start, addr + n - start

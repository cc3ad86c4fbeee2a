"""Soft-dirty tracking: the kernel's per-page "written since clear_refs" bit.

Arm writes 4 to /proc/PID/clear_refs (clears every soft-dirty bit and write-protects
the pages); collect reads bit 55 of /proc/PID/pagemap (or, on kernels that have both,
PAGEMAP_SCAN with PAGE_IS_SOFT_DIRTY) and clears again. Reading and clearing are two
steps, so the target must be frozen during collect or a write between them is lost;
collect checks that. Needs CONFIG_MEM_SOFT_DIRTY (absent on our 6.18 machines; Debian's
kernels have it).

One gap of the bit is closed here: a page dropped by MADV_DONTNEED and then read again
is the shared zero page without the soft-dirty bit, although its content changed. Such
pages are reported too (PFN of the zero page, visible to root, or PAGE_IS_PFNZERO).
"""
import mmap
import os
from functools import lru_cache

import numpy as np

from ..errors import KernelError, ProcessGoneError
from ..kernel import proc
from .base import Dirty, Tracker, TrackingError
from .reader import pagemap
from .regions import NO_PAGES, Region, pages_from_ranges, regions, split_by_region
from .scan import MAX_END, PAGE_IS_PFNZERO, PAGE_IS_SOFT_DIRTY, Scanner, supported

PM_SOFT_DIRTY = np.uint64(1 << 55)
PFN_MASK = np.uint64((1 << 55) - 1)


def clear_refs(pid: int) -> None:
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("4")
    except (FileNotFoundError, ProcessLookupError):
        raise ProcessGoneError(f"process {pid} does not exist (or exited)") from None
    except OSError as e:
        raise KernelError(f"clear_refs of process {pid}: {e.strerror}") from None


@lru_cache(maxsize=1)
def zero_pfn() -> int:
    """The zero page's PFN as pagemap shows it (0 when PFNs are hidden: not root)."""
    m = mmap.mmap(-1, 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        _ = m[0]  # a read fault maps the zero page
        import ctypes
        addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
        pm = proc.pagemap(os.getpid(), addr, addr + 4096)
        del addr
        if len(pm) and pm[0] & np.uint64(proc.PM_PRESENT):
            return int(pm[0] & PFN_MASK)
        return 0
    finally:
        try:
            m.close()
        except BufferError:
            pass


def _frozen(pid: int) -> bool:
    """Every thread in a ptrace stop (state 't')."""
    try:
        return all(proc.stat_fields(t)[0] in ("t", "T") for t in proc.threads(pid))
    except ProcessGoneError:
        raise


class SoftDirtyTracker(Tracker):
    name = "soft-dirty"

    def __init__(self, use_scan: bool | None = None) -> None:
        super().__init__()
        self.use_scan = use_scan
        self.zero_pages: dict[int, np.ndarray] = {}  # start -> page indices on the zero page

    def arm(self, pid: int, target, vmas) -> None:
        self._start(pid)
        if self.use_scan is None:
            self.use_scan = supported(pid)
        regs = regions(vmas)
        tr = [r for r in regs if r.trackable]
        _, self.zero_pages = self._scan(pid, tr) if self.use_scan else self._pagemap(pid, tr)
        clear_refs(pid)
        self._remember(regs)

    def collect(self, pid: int, vmas) -> Dirty:
        self._check_same(pid)
        if not _frozen(pid):
            raise TrackingError(f"soft-dirty collect needs process {pid} frozen: a write between "
                                "reading the bits and clearing them would be lost")
        regs = regions(vmas)
        keep, out = self._split(regs)
        tr = [r for r in regs if r.trackable]
        sd, zero = self._scan(pid, tr) if self.use_scan else self._pagemap(pid, tr)
        for r in keep:
            # a page that became the zero page since the last collect changed (to zeros)
            became_zero = np.setdiff1d(zero[r.start], self.zero_pages.get(r.start, NO_PAGES))
            out[r.start] = np.union1d(sd[r.start], became_zero).astype(np.int64)
        clear_refs(pid)
        self.zero_pages = zero
        self._remember(regs)
        return out

    def disarm(self) -> None:
        super().disarm()
        self.zero_pages = {}

    def _pagemap(self, pid: int, regs: list[Region]) -> tuple[Dirty, Dirty]:
        """(soft-dirty pages, zero-page pages) per mapping, from pagemap entries."""
        zp = np.uint64(zero_pfn())
        sd, zero = {}, {}
        for r in regs:
            pm = pagemap(pid, r.start, r.end)
            sd[r.start] = np.flatnonzero((pm & PM_SOFT_DIRTY) != 0).astype(np.int64)
            if zp:
                present = (pm & np.uint64(proc.PM_PRESENT)) != 0
                zero[r.start] = np.flatnonzero(present & ((pm & PFN_MASK) == zp)).astype(np.int64)
            else:
                zero[r.start] = NO_PAGES
        return sd, zero

    def _scan(self, pid: int, regs: list[Region]) -> tuple[Dirty, Dirty]:
        """The same through PAGEMAP_SCAN (kernels with both soft-dirty and the ioctl)."""
        regs = [r for r in regs if r.end <= MAX_END]
        if not regs:
            return {}, {}
        sc = Scanner(pid)
        try:
            lo, hi = min(r.start for r in regs), max(r.end for r in regs)
            s, e, _ = sc.scan(lo, hi, PAGE_IS_SOFT_DIRTY, PAGE_IS_SOFT_DIRTY)
            zs, ze, _ = sc.scan(lo, hi, PAGE_IS_PFNZERO, PAGE_IS_PFNZERO)
        finally:
            sc.close()
        return (split_by_region(pages_from_ranges(s, e), regs),
                split_by_region(pages_from_ranges(zs, ze), regs))

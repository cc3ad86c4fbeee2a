"""What an incremental dump writes: tracked dirty pages, cut to what the image needs.

For `hpcckpt dump --track-mem --parent PREV`, while the process is frozen:

    vmas = proc.maps(pid)                      # smaps: uffd-wp reads the "uw" flag from it
    dirty = tracker.collect(pid, vmas)         # re-arms in the same step
    pvmas = [memory.describe(pid, v) for v in vmas]
    plan = plan_incremental(pid, pvmas, dirty, parent_pages)

then copy `plan.write` runs into the new pages file (as today) and record the
`plan.in_parent` runs as "in the parent chain" in the pagemap image. Pages present now
and listed in neither do not exist: the restore must not take them from the parent
(this is how pages dropped since PREV, e.g. by MADV_DONTNEED, come back as zeros).
"""
from bisect import bisect_left, bisect_right
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from ..images import pb
from ..kernel import proc
from ..kernel.libc import PAGE_SIZE
from ..errors import HpcckptError, KernelError
from .base import Dirty
from ..engine.memory import SPARSE_MIN, pages_to_save
from .scan import MAX_END, PAGE_IS_FILE, PAGE_IS_PRESENT, PAGE_IS_SWAPPED, Scanner, supported
from .reader import pagemap, saved_mask
from .regions import pages_from_ranges


@dataclass
class IncrementalPlan:
    write: list[tuple[int, int]] = field(default_factory=list)      # (address, bytes): copy now
    in_parent: list[tuple[int, int]] = field(default_factory=list)  # (address, bytes): parent has them

    @property
    def write_bytes(self) -> int:
        return sum(n for _, n in self.write)

    @property
    def parent_bytes(self) -> int:
        return sum(n for _, n in self.in_parent)


@dataclass
class PageRanges:
    """Sorted, disjoint, merged [start, end) address ranges: what a parent chain holds for
    one process. Its pagemap runs as they are (~1 per 10 pages at a random 10% rewritten),
    instead of one sorted array entry per page looked up page by page (20 ms per 4 GiB)."""
    starts: np.ndarray     # int64
    ends: np.ndarray

    @classmethod
    def from_runs(cls, runs) -> "PageRanges":
        """From pagemap runs (pb.PageRun: vaddr, nr_pages), own and "in parent" alike."""
        starts = np.fromiter((r.vaddr for r in runs), dtype=np.int64, count=len(runs))
        counts = np.fromiter((r.nr_pages for r in runs), dtype=np.int64, count=len(runs))
        return cls._merged(starts, starts + counts * PAGE_SIZE)

    @classmethod
    def from_pages(cls, pages: np.ndarray) -> "PageRanges":
        pages = np.unique(np.asarray(pages, dtype=np.int64))
        if not len(pages):
            return cls(np.zeros(0, np.int64), np.zeros(0, np.int64))
        cut = np.flatnonzero(np.diff(pages) != PAGE_SIZE) + 1
        return cls(pages[np.r_[0, cut]], pages[np.r_[cut - 1, len(pages) - 1]] + PAGE_SIZE)

    @classmethod
    def _merged(cls, starts: np.ndarray, ends: np.ndarray) -> "PageRanges":
        if len(starts) > 1 and not (starts[1:] >= ends[:-1]).all():   # a pagemap's runs are
            order = np.argsort(starts, kind="stable")                  # sorted and disjoint;
            starts, ends = starts[order], ends[order]                  # be safe anyway
            ends = np.maximum.accumulate(ends)
        if len(starts) > 1:
            new = np.r_[True, starts[1:] > ends[:-1]]     # touching or overlapping: one range
            last = np.r_[np.flatnonzero(new)[1:] - 1, len(starts) - 1]
            starts, ends = starts[new], ends[last]
        return cls(starts, ends)

    def mask(self, start: int, n: int) -> np.ndarray:
        """Per page of [start, start + n pages): held?"""
        end = start + n * PAGE_SIZE
        i = int(np.searchsorted(self.ends, start, side="right"))
        j = int(np.searchsorted(self.starts, end, side="left"))
        return _mask(n, start, np.clip(self.starts[i:j], start, end), np.clip(self.ends[i:j], start, end))


def parent_pages_from_runs(runs) -> np.ndarray:
    """Sorted page addresses of a parent's pagemap runs (pb.PageRun: vaddr, nr_pages),
    its own and those it references in its parents: what the chain can give back."""
    if not runs:
        return np.zeros(0, np.int64)
    starts = np.fromiter((r.vaddr for r in runs), dtype=np.int64, count=len(runs))
    counts = np.fromiter((r.nr_pages for r in runs), dtype=np.int64, count=len(runs))
    pages = pages_from_ranges(starts, starts + counts * PAGE_SIZE)
    if len(pages) > 1 and not (pages[1:] > pages[:-1]).all():   # a pagemap's runs are sorted
        pages = np.unique(pages)                                  # and disjoint; be safe anyway
    return pages


def _scanned(v) -> bool:
    """Does the image hold some pages of this mapping, page by page (decided by a scan)?"""
    return not (v.kind in (pb.VDSO, pb.VVAR, pb.VVAR_VCLOCK, pb.VSYSCALL, pb.FILE_SHARED, pb.SYSV_SHM,
                           pb.ANON_SHARED) or v.shmid)


def _to_save(pid: int, v, scanner: "Scanner | _Scan | None" = None,
             full: frozenset = frozenset()) -> np.ndarray | None:
    """engine.memory.pages_to_save's rule as a mask, but with uffd-wp pte markers (absent
    pages that pagemap shows as swapped) left out. `full`: starts of private mappings
    whose every page is an anonymous page (smaps: Anonymous = size, Swap = 0, read while
    frozen), saved whole without a page walk."""
    if v.kind in (pb.VDSO, pb.VVAR, pb.VVAR_VCLOCK, pb.VSYSCALL, pb.FILE_SHARED, pb.SYSV_SHM) or v.shmid:
        return None     # shared memory objects are saved whole, once per tree (shmem-ID.img)
    n = (v.end - v.start) // PAGE_SIZE
    if v.kind == pb.ANON_SHARED or v.start in full:
        return np.ones(n, dtype=bool)
    if isinstance(scanner, _Scan):
        if scanner.covers(v):
            return scanner.to_save(pid, v)
        scanner = scanner.scanner
    if isinstance(scanner, Scanner) and v.end <= MAX_END:
        return _to_save_scan(pid, v, scanner)
    return saved_mask(pagemap(pid, v.start, v.end), v.kind == pb.FILE_PRIVATE)


@dataclass
class _Scan:
    """One PAGEMAP_SCAN of all the mappings a plan looks at (present or swapped pages,
    with their file bit), cut per mapping afterwards: a process of 21 mappings took 42
    ioctls (and as many vector copies) before, ~1 ms per process of a tree."""
    lo: int
    hi: int
    starts: np.ndarray
    ends: np.ndarray
    cats: np.ndarray

    spans: list = field(default_factory=list)   # [lo, hi) address ranges scanned
    scanner: Scanner | None = None               # for the mappings left out
    scanned: frozenset = frozenset()             # starts of the mappings looked at
    _lists: tuple | None = None                  # starts, ends, cats as lists (runs)

    @classmethod
    def of(cls, sc: Scanner, pvmas, full: frozenset = frozenset()) -> "_Scan | None":
        """`full`: starts of mappings known to be wholly populated with anonymous pages
        (smaps), which need no page walk: consecutive others are scanned together."""
        vs = sorted((v for v in pvmas if _scanned(v) and v.end <= MAX_END and v.start not in full
                     and v.end - v.start <= SPARSE_MIN), key=lambda v: v.start)
        if not vs:
            return None
        spans: list[list[int]] = []
        others = sorted(v.start for v in pvmas if v.start in full or v.end - v.start > SPARSE_MIN)
        for v in vs:    # a range may not reach over a mapping we skip
            if spans and not any(spans[-1][1] <= o < v.start for o in others):
                spans[-1][1] = v.end
            else:
                spans.append([v.start, v.end])
        parts = [sc.scan(lo, hi, 0, PAGE_IS_PRESENT | PAGE_IS_FILE | PAGE_IS_SWAPPED,
                         anyof_mask=PAGE_IS_PRESENT | PAGE_IS_SWAPPED) for lo, hi in spans]
        s, e, c = (np.concatenate([p[k] for p in parts]) for k in range(3))
        return cls(spans[0][0], spans[-1][1], s.astype(np.int64), e.astype(np.int64), c,
                   [tuple(x) for x in spans], sc, frozenset(v.start for v in vs))

    def covers(self, v) -> bool:
        return any(lo <= v.start and v.end <= hi for lo, hi in self.spans)

    def runs(self, v) -> list[tuple[int, int]] | None:
        """(address, bytes) runs of the pages `to_save` keeps, straight from the scanned
        ranges: what a full dump writes, without a page mask per mapping (numpy work that
        cost ~1 ms per process of a tree). None where a range is swapped out (its pages
        need pagemap's per-page rule: `to_save`)."""
        if self._lists is None:
            self._lists = (self.starts.tolist(), self.ends.tolist(), self.cats.tolist())
        starts, ends, cats = self._lists
        out: list[tuple[int, int]] = []
        for k in range(bisect_right(ends, v.start), bisect_left(starts, v.end)):
            c = cats[k]
            if c & PAGE_IS_SWAPPED:
                return None
            if not c & PAGE_IS_PRESENT or (v.kind == pb.FILE_PRIVATE and c & PAGE_IS_FILE):
                continue     # of a private file mapping only the process's own copies
            a, b = max(starts[k], v.start), min(ends[k], v.end)
            if out and out[-1][0] + out[-1][1] == a:
                out[-1] = (out[-1][0], b - out[-1][0])
            elif b > a:
                out.append((a, b - a))
        return out

    def to_save(self, pid: int, v) -> np.ndarray:
        n = (v.end - v.start) // PAGE_SIZE
        i = int(np.searchsorted(self.ends, v.start, side="right"))
        j = int(np.searchsorted(self.starts, v.end, side="left"))
        s = np.clip(self.starts[i:j], v.start, v.end)
        e = np.clip(self.ends[i:j], v.start, v.end)
        c = self.cats[i:j]
        present = (c & np.uint64(PAGE_IS_PRESENT)) != 0
        if v.kind == pb.FILE_PRIVATE:     # present and anonymous: the process's own copies
            present &= (c & np.uint64(PAGE_IS_FILE)) == 0
        mask = _mask(n, v.start, s[present], e[present])
        swapped = (c & np.uint64(PAGE_IS_SWAPPED)) != 0
        for a, b in zip(s[swapped].tolist(), e[swapped].tolist()):
            mask[(a - v.start) // PAGE_SIZE:(b - v.start) // PAGE_SIZE] |= saved_mask(
                pagemap(pid, a, b), False)     # swapped, not a uffd-wp marker
        return mask


def _mask(n: int, base: int, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Boolean page mask of n pages from sorted, disjoint [start, end) address ranges."""
    if len(starts) <= 64:     # few ranges (a populated mapping, its parent's run): slices
        mask = np.zeros(n, dtype=bool)
        for a, b in zip(((starts.astype(np.int64) - base) // PAGE_SIZE).tolist(),
                        ((ends.astype(np.int64) - base) // PAGE_SIZE).tolist()):
            mask[a:b] = True
        return mask
    up = np.bincount((starts.astype(np.int64) - base) // PAGE_SIZE, minlength=n + 1)
    down = np.bincount((ends.astype(np.int64) - base) // PAGE_SIZE, minlength=n + 1)
    return np.cumsum(up[:n] - down[:n]) > 0


def _to_save_scan(pid: int, v, sc: Scanner) -> np.ndarray:
    """The same mask from PAGEMAP_SCAN ranges: the kernel walks the page tables and
    returns ranges, instead of 8 bytes per page to read and decode (40 ms per 4 GiB read,
    ~1 ms scanned). Swapped ranges (rare; also where uffd-wp left pte markers) are
    decided from their pagemap entries."""
    n = (v.end - v.start) // PAGE_SIZE
    if v.kind == pb.FILE_PRIVATE:     # present and anonymous: the process's own copies
        s, e, _ = sc.scan(v.start, v.end, PAGE_IS_PRESENT | PAGE_IS_FILE, PAGE_IS_PRESENT,
                          inverted=PAGE_IS_FILE)
    else:
        s, e, _ = sc.scan(v.start, v.end, PAGE_IS_PRESENT, PAGE_IS_PRESENT)
    mask = _mask(n, v.start, s, e)
    s, e, _ = sc.scan(v.start, v.end, PAGE_IS_SWAPPED, PAGE_IS_SWAPPED)
    for a, b in zip(s.tolist(), e.tolist()):
        i, j = (a - v.start) // PAGE_SIZE, (b - v.start) // PAGE_SIZE
        mask[i:j] |= saved_mask(pagemap(pid, a, b), False)     # swapped, not a marker
    return mask


@lru_cache(maxsize=1)
def scan_supported() -> bool:
    return supported()


def plan_incremental(pid: int, pvmas, dirty: Dirty | None,
                     parent_pages: "np.ndarray | PageRanges | None",
                     full: frozenset = frozenset()) -> IncrementalPlan:
    """Split the pages the dump must hold into those to write and those in the parent.

    `pvmas`: the image's pb.Vma list (engine.memory.describe). `dirty`: a tracker's
    collect() result, None for a full dump. `parent_pages`: sorted page addresses the
    parent chain holds (parent_pages_from_runs), None for a full dump. A page goes to
    the parent only when it is to be saved now, was not reported dirty, and the parent
    chain has it; everything else to be saved is written. `full`: see _to_save.
    """
    plan = IncrementalPlan()
    for start, write, reuse in plan_masks(pid, pvmas, dirty, parent_pages, full):
        if reuse is None:           # a sparse mapping's runs, all to write
            plan.write += write
            continue
        plan.write += proc.address_runs(write, start)
        plan.in_parent += proc.address_runs(reuse, start)
    return plan


def plan_masks(pid: int, pvmas, dirty: Dirty | None, parent_pages: "np.ndarray | PageRanges | None",
               full: frozenset = frozenset()) -> list[tuple[int, object, "np.ndarray | None"]]:
    """plan_incremental's decision before it is made into runs: per mapping (start,
    write mask, in-parent mask), or (start, runs to write, None) for a sparse mapping.
    Masks are cheap while frozen; making them into runs costs ~1 us per run (a caller
    that can, does it after the thaw: engine/precopy.py)."""
    out: list = []
    if parent_pages is not None and not isinstance(parent_pages, PageRanges):
        parent_pages = PageRanges.from_pages(parent_pages)
    try:
        scanner = Scanner(pid) if scan_supported() else None
    except HpcckptError:
        scanner = None
    try:
        source = scanner
        if scanner is not None:
            try:
                source = _Scan.of(scanner, pvmas, full) or scanner
            except KernelError:
                source = scanner      # scanned mapping by mapping instead
        for v in pvmas:
            m = _masks_one(pid, v, source, dirty, parent_pages, full)
            if m is not None:
                out.append((v.start, *m))
    finally:
        if scanner is not None:
            scanner.close()
    return out


def _masks_one(pid: int, v, scanner: "Scanner | _Scan | None", dirty: Dirty | None,
               parent_pages: PageRanges | None, full: frozenset = frozenset()):
    if parent_pages is None and isinstance(scanner, _Scan) and v.start in scanner.scanned:
        runs = scanner.runs(v)      # all to write: the scan's ranges are the runs, no page mask
        if runs is not None:
            return runs, None
    d = None if dirty is None else dirty.get(v.start)
    if (d is None or parent_pages is None) and _scanned(v) and v.end - v.start > SPARSE_MIN:
        # all to write, of a mapping maybe terabytes large and mostly empty (a server's
        # reservation): its populated ranges, never a mask of all its pages; all of it
        # when smaps says every page is an anonymous page (`full`): no walk needed
        return ([(v.start, v.end - v.start)] if v.start in full else pages_to_save(pid, v)), None
    save = _to_save(pid, v, scanner, full)
    if save is None or not save.any():
        return None
    n = len(save)
    reuse = save.copy()
    if d is None or parent_pages is None:
        reuse[:] = False
    else:
        reuse[d[d < n]] = False
        reuse &= parent_pages.mask(v.start, n)
    return save & ~reuse, reuse

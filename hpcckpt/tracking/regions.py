"""One view of a mapping for every tracker, and the rule for "this mapping changed".

Trackers are handed the dump's mapping list (proc.Vma from /proc/PID/smaps, or the
image's pb.Vma); both are turned into a Region here so the backends compare like with
like. A mapping whose identity (range, protection, sharing, backing file and offset)
differs from the one seen at the previous arm/collect is reported wholly dirty: the
kernel's per-page bits say nothing reliable about a range that was unmapped, moved,
grown or re-created, so only a whole report is exact.
"""
from dataclasses import dataclass, field

import numpy as np

from ..kernel.libc import PAGE_SIZE

SPECIAL_PATHS = ("[vdso]", "[vvar]", "[vvar_vclock]", "[vsyscall]")
_PROT_BITS = {"r": 1, "w": 2, "x": 4}


@dataclass(frozen=True)
class Region:
    """A mapping as trackers see it; `vmflags` is informative and not part of identity."""
    start: int
    end: int
    prot: int          # PROT_* bits
    shared: bool
    path: str
    pgoff: int
    inode: int         # -1 when the source does not say (pb.Vma)
    vmflags: tuple[str, ...] = field(default=(), compare=False)

    @property
    def key(self) -> tuple:
        return (self.start, self.end, self.prot, self.shared, self.path, self.pgoff, self.inode)

    @property
    def npages(self) -> int:
        return (self.end - self.start) // PAGE_SIZE

    @property
    def special(self) -> bool:
        """vDSO family: never saved, never tracked."""
        return self.path in SPECIAL_PATHS

    @property
    def trackable(self) -> bool:
        """Private, ordinary mappings: the only ones whose pages can be tracked per page.

        Shared mappings may be written through another process's mapping, which no
        per-process page bit sees, so they are always reported whole.
        """
        return not self.shared and not self.special

    def all_pages(self) -> np.ndarray:
        return np.arange(self.npages, dtype=np.int64)


def region(v) -> Region:
    """Region from a proc.Vma (prot "rw-p") or a pb.Vma (prot bits, shared flag)."""
    if isinstance(v, Region):
        return v
    if isinstance(v.prot, str):
        prot = sum(b for ch, b in _PROT_BITS.items() if ch in v.prot)
        return Region(v.start, v.end, prot, v.prot[3] == "s", v.path, v.pgoff, v.inode,
                      tuple(getattr(v, "vmflags", ()) or ()))
    return Region(v.start, v.end, int(v.prot), bool(v.shared), v.path, int(v.pgoff), -1,
                  tuple(getattr(v, "vmflags", ()) or ()))


def regions(vmas) -> list[Region]:
    return [region(v) for v in vmas]


NO_PAGES = np.zeros(0, dtype=np.int64)


def pages_from_ranges(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Page addresses covered by [start, end) ranges (vectorised; ranges sorted)."""
    if len(starts) == 0:
        return np.zeros(0, dtype=np.int64)
    s = starts.astype(np.int64) // PAGE_SIZE
    n = (ends.astype(np.int64) - starts.astype(np.int64)) // PAGE_SIZE
    total = int(n.sum())
    # each range contributes s, s+1, ..., s+n-1: a running count reset at range starts
    offs = np.repeat(np.cumsum(n) - n, n)
    return (np.repeat(s, n) + np.arange(total, dtype=np.int64) - offs) * PAGE_SIZE


def split_by_region(page_addrs: np.ndarray, regs: list[Region]) -> dict[int, np.ndarray]:
    """Sorted page addresses -> {region start: page indices inside it}."""
    out: dict[int, np.ndarray] = {}
    for r in regs:
        a = np.searchsorted(page_addrs, r.start)
        b = np.searchsorted(page_addrs, r.end)
        out[r.start] = (page_addrs[a:b] - r.start) // PAGE_SIZE
    return out

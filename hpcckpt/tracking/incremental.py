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
from dataclasses import dataclass, field

import numpy as np

from ..images import pb
from ..kernel import proc
from ..kernel.libc import PAGE_SIZE
from .base import Dirty
from .reader import pagemap, saved_mask


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


def parent_pages_from_runs(runs) -> np.ndarray:
    """Sorted page addresses of a parent's pagemap runs (pb.PageRun: vaddr, nr_pages),
    its own and those it references in its parents: what the chain can give back."""
    parts = [r.vaddr + np.arange(r.nr_pages, dtype=np.int64) * PAGE_SIZE for r in runs]
    return np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.int64)


def _to_save(pid: int, v) -> np.ndarray | None:
    """engine.memory.pages_to_save's rule as a mask, but with uffd-wp pte markers (absent
    pages that pagemap shows as swapped) left out."""
    if v.kind in (pb.VDSO, pb.VVAR, pb.VVAR_VCLOCK, pb.VSYSCALL, pb.FILE_SHARED, pb.SYSV_SHM) or v.shmid:
        return None     # shared memory objects are saved whole, once per tree (shmem-ID.img)
    n = (v.end - v.start) // PAGE_SIZE
    if v.kind == pb.ANON_SHARED:
        return np.ones(n, dtype=bool)
    return saved_mask(pagemap(pid, v.start, v.end), v.kind == pb.FILE_PRIVATE)


def plan_incremental(pid: int, pvmas, dirty: Dirty | None, parent_pages: np.ndarray | None) -> IncrementalPlan:
    """Split the pages the dump must hold into those to write and those in the parent.

    `pvmas`: the image's pb.Vma list (engine.memory.describe). `dirty`: a tracker's
    collect() result, None for a full dump. `parent_pages`: sorted page addresses the
    parent chain holds (parent_pages_from_runs), None for a full dump. A page goes to
    the parent only when it is to be saved now, was not reported dirty, and the parent
    chain has it; everything else to be saved is written.
    """
    plan = IncrementalPlan()
    for v in pvmas:
        save = _to_save(pid, v)
        if save is None or not save.any():
            continue
        n = len(save)
        reuse = save.copy()
        d = None if dirty is None else dirty.get(v.start)
        if d is None or parent_pages is None:
            reuse[:] = False
        else:
            reuse[d[d < n]] = False
            addrs = v.start + np.arange(n, dtype=np.int64) * PAGE_SIZE
            i = np.minimum(np.searchsorted(parent_pages, addrs), max(len(parent_pages) - 1, 0))
            has = parent_pages[i] == addrs if len(parent_pages) else np.zeros(n, bool)
            reuse &= has
        write = save & ~reuse
        plan.write += [(v.start + a * PAGE_SIZE, k * PAGE_SIZE) for a, k in proc.runs(write)]
        plan.in_parent += [(v.start + a * PAGE_SIZE, k * PAGE_SIZE) for a, k in proc.runs(reuse)]
    return plan

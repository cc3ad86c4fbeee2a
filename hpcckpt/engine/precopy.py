"""Pre-copy rounds before an incremental dump freezes the job (as live migration does).

With uffd-wp tracking armed since the parent image, the pages written since can be
copied while the job runs: collect (report and re-protect in one PAGEMAP_SCAN), copy
what it reported, and again, until what a round finds is small or stops shrinking
(bounded). The dump then freezes, collects once more and copies only what was written
since the last round; every other changed page is taken from the rounds' copies, each
made after its page's last report, so it is the content at the freeze (a write after a
report is itself reported at the next collect, and its page copied again or re-read
while frozen). Pages written in any round count as changed for the plan, so the parent
is never asked for a page the job changed.

The rounds' copies go to a memfd; the dump appends the valid ones to the page file after
the thaw. While frozen only the masks of the plan are made, and runs of the pages to
copy then: the rest of the plan (~1 us per run) waits for the thaw too.
"""
import os
import time
from dataclasses import dataclass, field

import numpy as np

from ..errors import HpcckptError
from ..kernel import proc
from ..kernel.libc import PAGE_SIZE
from ..tracking.base import Dirty
from ..tracking.incremental import plan_masks
from ..tracking.regions import regions
from ..tracking.scan import MAX_END, PAGE_IS_PRESENT, Scanner
from ..tracking.uffd_wp import UffdWpTracker
from . import memory

MAX_ROUNDS = 5
PROBE_S = 0.003          # the wait between the first two collects (the job's write rate)
COPY_RATE = 5e8          # bytes per second a round copies scattered single pages (~0.5 GB/s measured)
FEW = 16 << 20           # changes this small are left to the freeze
ROUND_S = 0.05           # a round's collect at 4 GiB (maps, scan, re-protect, present runs)
SMALL = 1 << 20          # a round that finds this little is the last
SHRINK = 0.7             # a round that finds more than this share of what the one before
                         # copied is not copied (the job writes about as fast as we copy)


@dataclass
class _Proc:
    tracker: UffdWpTracker
    fd: int
    writer: memory.PageWriter
    held: dict[int, int] = field(default_factory=dict)      # page -> offset in the memfd
    reported: list[np.ndarray] = field(default_factory=list)   # page addresses, per round
    # made once the rounds are over (no per-page Python while frozen): sorted arrays of
    # the pages reported in any round, and of those a round copy holds
    changed: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    held_pages: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    final: Dirty = field(default_factory=dict)        # the frozen collect's report
    final_bytes: int = 0                               # ... of it, in private mappings
    uncopied: int = 0                # bytes of the last round's report, left uncopied


@dataclass
class PreCopy:
    procs: dict[int, _Proc] = field(default_factory=dict)
    rounds: list[int] = field(default_factory=list)        # bytes copied per round
    failed: set[int] = field(default_factory=set)          # processes whose tracking is not to be trusted

    @classmethod
    def run(cls, trackers: dict[int, UffdWpTracker], notes: list[str]) -> "PreCopy":
        """Copy rounds for the (running) processes whose uffd-wp tracker is given."""
        pc = cls()
        for h, t in trackers.items():
            fd = os.memfd_create("hpcckpt-precopy", os.MFD_CLOEXEC)
            pc.procs[h] = _Proc(t, fd, memory.PageWriter(h, fd))
        if not pc._rounds_pay(notes):
            pc.close()         # no round: the dump copies every change as without rounds
            return pc
        for _ in range(MAX_ROUNDS):
            runs = pc._collect_all(notes)
            n = _bytes(runs)
            if (pc.rounds and n > pc.rounds[-1] * SHRINK):
                # not shrinking: copying it would only let the job change more meanwhile
                for h, r in runs.items():
                    if r and h in pc.procs:
                        pc.procs[h].uncopied = sum(k for _, k in r)
                break
            for h, r in runs.items():
                if r and h in pc.procs:
                    pc._guarded(h, notes, pc._copy, pc.procs[h], r)
            pc.rounds.append(n)
            if n <= SMALL:
                break
        for p in pc.procs.values():
            p.changed = np.unique(np.concatenate(p.reported)) if p.reported else p.changed
            p.held_pages = np.array(sorted(p.held), dtype=np.int64)
        return pc

    def _rounds_pay(self, notes: list[str]) -> bool:
        """Not when little has changed (the freeze copies it in a few ms; counting costs
        the job as much), nor when the job would write more during a round (its collect,
        then its copy) than the round copies: rounds would only let it change more before
        the freeze (a job writing ~700 MB/s had its final pause grow 1.4-1.7x). Two counts
        of the written pages PROBE_S apart tell, nothing re-protected."""
        try:
            vmas = {h: proc.maps(h, with_flags=False) for h in self.procs}
            t0 = time.monotonic()
            w0 = sum(p.tracker.written_bytes(vmas[h]) for h, p in self.procs.items())
            if w0 <= FEW:
                return False
            time.sleep(PROBE_S)
            w1 = sum(p.tracker.written_bytes(vmas[h]) for h, p in self.procs.items())
            rate = max(0, w1 - w0) / (time.monotonic() - t0)
        except (HpcckptError, OSError) as e:
            notes.append(f"pre-copy rounds skipped: the write-rate probe failed ({e})")
            return False
        return rate * (ROUND_S + w1 / COPY_RATE) <= w1 * SHRINK

    def _collect_all(self, notes: list[str]) -> dict[int, list | None]:
        return {h: self._guarded(h, notes, self._collect, h, p) for h, p in list(self.procs.items())}

    def _guarded(self, h: int, notes: list[str], fn, *args):
        try:
            return fn(*args)
        except (HpcckptError, OSError) as e:
            # a collect that failed half-way may have re-protected pages it did not
            # report: this tracker's word is lost (the dump compares digests)
            notes.append(f"process {h}: pre-copy round failed ({e}); its changes are "
                         "found by comparing page digests")
            self.failed.add(h)
            os.close(self.procs.pop(h).fd)
            return None

    def _collect(self, h: int, p: _Proc) -> list[tuple[int, int]]:
        """One round's collect: the present pages written since the last (their earlier
        copies are stale now), as runs to copy."""
        vmas = proc.maps(h, with_flags=False)
        regs = [r for r in regions(vmas) if r.trackable]
        dirty = p.tracker.collect(h, vmas)
        pages = _addresses(dirty, {r.start for r in regs})
        for a in pages.tolist():
            p.held.pop(a, None)
        p.reported.append(pages)
        return _present_runs(h, pages)

    def _copy(self, p: _Proc, runs: list[tuple[int, int]]) -> None:
        offs = p.writer.copy_runs(runs)
        for (addr, n), off in zip(runs, offs):
            for k in range(0, n, PAGE_SIZE):
                p.held[addr + k] = off + k

    def changes(self, h: int, dirty: Dirty | None, vmas) -> Dirty | None:
        """The frozen collect's report widened by every page the rounds saw changed."""
        p = self.procs.get(h)
        if p is None or dirty is None:
            return dirty
        p.final = dirty                        # their round copies are stale: see plan()
        out = dict(dirty)
        ch = p.changed
        for v in regions(vmas):
            if v.start >= MAX_END:
                continue
            if v.trackable:        # shared ones are written whole by any dump
                p.final_bytes += len(dirty.get(v.start, ())) * PAGE_SIZE
            lo, hi = np.searchsorted(ch, v.start), np.searchsorted(ch, v.end)
            if hi > lo:       # repeated indices are harmless to the plan: no sort while frozen
                idx = (ch[lo:hi] - v.start) // PAGE_SIZE
                out[v.start] = np.concatenate((out.get(v.start, np.zeros(0, dtype=np.int64)), idx))
        return out

    def plan(self, h: int, pvmas, dirty: Dirty, parent_pages, full: frozenset) -> tuple[list, list]:
        """While frozen: (runs to copy now, the rest of the plan as masks for `finish`).
        Now: the pages to write that no round copy holds (changed since the last round,
        or absent then). Made into runs only those: the rest after the thaw."""
        p = self.procs[h]
        hk, fin = p.held_pages, _addresses(p.final, None)
        now: list[tuple[int, int]] = []
        rest = []
        for start, write, reuse in plan_masks(h, pvmas, dirty, parent_pages, full):
            if reuse is None:
                now += write
                continue
            held = np.zeros(len(write), dtype=bool)
            end = start + len(write) * PAGE_SIZE
            lo, hi = np.searchsorted(hk, start), np.searchsorted(hk, end)
            held[(hk[lo:hi] - start) // PAGE_SIZE] = True
            lo, hi = np.searchsorted(fin, start), np.searchsorted(fin, end)
            held[(fin[lo:hi] - start) // PAGE_SIZE] = False      # changed since its copy
            now += proc.address_runs(write & ~held, start)
            rest.append((start, write & held, reuse))
        return now, rest

    def finish(self, h: int, rest: list, page_file) -> list[tuple[int, int]]:
        """After the thaw: the round copies of the pages `plan` left to them appended to
        `page_file` (engine.pagefile.PageFile); returns the runs the parent holds."""
        p = self.procs[h]
        w = page_file.writer
        in_parent = []
        for start, held, reuse in rest:
            in_parent += proc.address_runs(reuse, start)
            for a in (np.flatnonzero(held) * PAGE_SIZE + start).tolist():
                page_file.written.append((a, PAGE_SIZE, w.offset))
                w._emit(memoryview(os.pread(p.fd, PAGE_SIZE, p.held[a])))
                w.offset += PAGE_SIZE
        return in_parent

    @property
    def final_bytes(self) -> int:
        """What the freeze must copy: the frozen collect's report (private mappings) and
        the last round's if it was not copied."""
        return sum(p.final_bytes + p.uncopied for p in self.procs.values())

    def drop(self) -> None:
        """The rounds' copies are not used (the dump copies every change otherwise): the
        changes they saw still are (`changes`)."""
        self.close()

    def close(self) -> None:
        for p in self.procs.values():
            if p.fd >= 0:
                os.close(p.fd)
                p.fd = -1
        self.procs = {}


def _bytes(runs: dict[int, list | None]) -> int:
    return sum(sum(k for _, k in r) for r in runs.values() if r)


def _addresses(dirty: Dirty, starts: set[int] | None) -> np.ndarray:
    """Sorted page addresses of a collect's report (of the mappings starting at `starts`)."""
    parts = [np.asarray(idx, dtype=np.int64) * PAGE_SIZE + s for s, idx in dirty.items()
             if (starts is None or s in starts) and s < MAX_END and len(idx)]
    return np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.int64)


def _present_runs(pid: int, pages: np.ndarray) -> list[tuple[int, int]]:
    """Runs of `pages` (sorted addresses) that are present now. Not swapped ones: the scan
    shows a uffd-wp marker (a dropped page) as swapped too, and reading it would map a
    zero page there; the dump reads swapped pages while frozen."""
    if len(pages) == 0:
        return []
    sc = Scanner(pid)
    try:
        s, e, _ = sc.scan(int(pages[0]), int(pages[-1]) + PAGE_SIZE, PAGE_IS_PRESENT, PAGE_IS_PRESENT)
    finally:
        sc.close()
    idx = np.searchsorted(s.astype(np.int64), pages, side="right") - 1
    ok = (idx >= 0) & (pages < e.astype(np.int64)[np.maximum(idx, 0)])
    keep = pages[ok]
    runs: list[tuple[int, int]] = []
    for a in keep.tolist():
        if runs and runs[-1][0] + runs[-1][1] == a:
            runs[-1] = (runs[-1][0], runs[-1][1] + PAGE_SIZE)
        else:
            runs.append((a, PAGE_SIZE))
    return runs

"""plan_incremental: write only dirty pages, reference the rest, drop vanished ones."""
import numpy as np
import pytest

from hpcckpt.engine import memory
from hpcckpt.engine.dump import _populated
from hpcckpt.engine.freeze import freeze
from hpcckpt.kernel import proc
from hpcckpt.tracking import HashingTracker, UffdWpTracker
from hpcckpt.images import pb
from hpcckpt.tracking.incremental import _Scan, _to_save, plan_incremental, scan_supported
from hpcckpt.tracking.scan import Scanner
from hpcckpt.tracking.select import available_backends

from .helpers import PAGE, arm


def _plan(tracker, t, parent):
    fr = freeze(t.pid)
    try:
        vmas = proc.maps(t.pid)
        dirty = tracker.collect(t.pid, vmas)
        return plan_incremental(t.pid, [memory.describe(t.pid, v) for v in vmas], dirty, parent)
    finally:
        fr.thaw()


def _pages(runs, lo, hi):
    return {(a - lo) // PAGE + k for a, n in runs for k in range(n // PAGE) if lo <= a < hi}


def test_plan(target):
    tracker = UffdWpTracker() if "uffd-wp" in available_backends() else HashingTracker()
    buf = target.alloc(64)
    arm(tracker, target)
    # the parent holds every present page of the process (as a full dump would)
    fr = freeze(target.pid)
    try:
        full = plan_incremental(target.pid, [memory.describe(target.pid, v) for v in proc.maps(target.pid)], None, None)
    finally:
        fr.thaw()
    parent = np.unique(np.concatenate([a + np.arange(n // PAGE, dtype=np.int64) * PAGE for a, n in full.write]))
    target.write(buf + 5 * PAGE, 2)
    assert target.cmd(f"d {buf + 30 * PAGE:x} 2") == "ok"
    plan = _plan(tracker, target, parent)
    end = buf + 64 * PAGE
    assert _pages(plan.write, buf, end) == {5, 6}
    assert _pages(plan.in_parent, buf, end) == set(range(64)) - {5, 6, 30, 31}
    assert plan.write_bytes < full.write_bytes
    tracker.disarm()


def test_save_mask_from_pagemap_scan_equals_pagemap(target):
    """The plan's save mask from PAGEMAP_SCAN ranges is the one pagemap entries give:
    present, dropped (with uffd-wp pte markers), zero-page reads, THP, file-private copies."""
    if not scan_supported():
        pytest.skip("no PAGEMAP_SCAN on this kernel")
    buf = target.alloc(128)
    huge = target.alloc(1024, huge=True)
    whole = target.alloc(32)
    target.write(whole, 32)
    assert target.cmd(f"m {whole:x} 32 16") == "ok"      # MADV_DONTDUMP: a mapping of its own
    tracker = UffdWpTracker() if "uffd-wp" in available_backends() else HashingTracker()
    arm(tracker, target)
    try:
        assert target.cmd(f"d {buf + 10 * PAGE:x} 20") == "ok"      # markers where tracked
        assert target.cmd(f"r {buf + 12 * PAGE:x} 4") == "ok"       # zero pages read back
        target.write(buf + 100 * PAGE, 3)
        assert target.cmd(f"d {huge + 600 * PAGE:x} 7") == "ok"     # splits the huge page
        target.cmd("b 40000")
        fr = freeze(target.pid)
        try:
            smaps = proc.maps(target.pid)
            vmas = [memory.describe(target.pid, v) for v in smaps]
            full = _populated(smaps)            # wholly anonymous: no page walk needed
            assert any(v.start <= whole < v.end for v in smaps if v.start in full)
            assert not any(v.start <= buf < v.end for v in smaps if v.start in full)
            sc = Scanner(target.pid)
            try:
                kinds, fast_kinds = set(), set()
                once = _Scan.of(sc, vmas)      # one scan of the whole layout, cut per mapping
                skipping = _Scan.of(sc, vmas, full)
                for v in vmas:
                    slow, fast = _to_save(target.pid, v, None), _to_save(target.pid, v, sc)
                    assert (slow is None) == (fast is None), v
                    if slow is not None:
                        assert once.covers(v)
                        assert np.array_equal(slow, fast), (hex(v.start), v.path)
                        assert np.array_equal(slow, _to_save(target.pid, v, once)), (hex(v.start), v.path)
                        assert np.array_equal(slow, _to_save(target.pid, v, skipping, full)), hex(v.start)
                        assert skipping.covers(v) != (v.start in full)
                        kinds.add(v.kind)
                        # a full dump's runs, cut from the scan without a mask: the mask's
                        # runs, or None where a swapped range (a marker) needs pagemap
                        runs = once.runs(v)
                        if runs is not None:
                            assert runs == [(v.start + a * PAGE, n * PAGE) for a, n in proc.runs(slow)], hex(v.start)
                            fast_kinds.add(v.kind)
                    elif v.start in once.scanned:
                        assert False, f"{v.start:#x} scanned but saved by no page rule"
            finally:
                sc.close()
        finally:
            fr.thaw()
        assert {pb.ANON_PRIVATE, pb.FILE_PRIVATE} <= kinds
        assert {pb.ANON_PRIVATE, pb.FILE_PRIVATE} <= fast_kinds
        mask = _to_save(target.pid, next(v for v in vmas if v.start <= buf < v.end), None)
        assert not mask[(buf - next(v for v in vmas if v.start <= buf < v.end).start) // PAGE + 10]
    finally:
        tracker.disarm()


def test_page_ranges_mask_matches_pages():
    """The parent's pages as merged ranges answer exactly as the page list did: runs
    touching, overlapping, out of order, and windows cutting through them."""
    from hpcckpt.tracking.incremental import PageRanges, parent_pages_from_runs
    rng = np.random.default_rng(7)
    base = 0x7f0000000000
    runs = [pb.PageRun(vaddr=base + int(a) * PAGE, nr_pages=int(k))
            for a, k in zip(rng.integers(0, 5000, 400), rng.integers(1, 9, 400))]
    pages = parent_pages_from_runs(runs)
    held = set(pages.tolist())
    for pr in (PageRanges.from_runs(runs), PageRanges.from_pages(pages)):
        assert (pr.starts[1:] > pr.ends[:-1]).all()          # merged: no two touch
        for lo, n in ((0, 5100), (17, 1), (100, 333), (4990, 200), (6000, 10)):
            got = pr.mask(base + lo * PAGE, n)
            want = np.array([base + (lo + i) * PAGE in held for i in range(n)])
            assert (got == want).all(), (lo, n)
    assert not PageRanges.from_pages(np.zeros(0, np.int64)).mask(base, 4).any()

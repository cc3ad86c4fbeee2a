"""plan_incremental: write only dirty pages, reference the rest, drop vanished ones."""
import numpy as np

from hpcckpt.engine import memory
from hpcckpt.engine.freeze import freeze
from hpcckpt.kernel import proc
from hpcckpt.tracking import HashingTracker, UffdWpTracker
from hpcckpt.tracking.incremental import plan_incremental
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

"""Backend-specific behaviour: uffd-wp's per-mapping fallback and hidden fd, hashing's
saved digests, and backend selection."""
import os

import pytest

from hpcckpt.kernel import proc
from hpcckpt.tracking import HashingTracker, TrackingError, TrackingLostError, UffdWpTracker
from hpcckpt.tracking.select import available_backends, choose, probe

from .helpers import PAGE, arm, collect, pages


def _need(name):
    if name not in available_backends():  # a kernel without it; the probe says why
        detail = {r.name: r for r in probe()}[name].detail
        pytest.skip(f"{name} does not work on this kernel: {detail}")


def test_uffd_refused_mapping_falls_back_to_hashing(target):
    """A mapping held by the process's own userfaultfd cannot be registered by us:
    that mapping (only) is tracked by content hashing, still exactly."""
    _need("uffd-wp")
    mine = target.alloc(64)
    theirs = target.alloc(64)
    assert target.cmd(f"U {theirs:x} 64") == "ok"
    t = UffdWpTracker()
    try:
        arm(t, target)
        assert t.fallback_starts == {theirs}
        assert theirs in t.refused
        target.write(mine + 5 * PAGE)
        target.write(theirs + 7 * PAGE, 3, 2)
        dirty = collect(t, target)
        assert pages(dirty, mine) == {5}
        assert pages(dirty, theirs) == {7, 9, 11}
        target.write(theirs + 60 * PAGE)
        dirty = collect(t, target)
        assert pages(dirty, theirs) == {60} and pages(dirty, mine) == set()
    finally:
        t.disarm()


def test_uffd_leaves_no_fd_in_target(target):
    _need("uffd-wp")
    before = sorted(os.listdir(f"/proc/{target.pid}/fd"))
    t = UffdWpTracker()
    try:
        arm(t, target)
        assert sorted(os.listdir(f"/proc/{target.pid}/fd")) == before
        flags = {f for v in proc.maps(target.pid) for f in v.vmflags}
        assert "uw" in flags  # registered for write-protect
    finally:
        t.disarm()
    assert not any("uw" in v.vmflags for v in proc.maps(target.pid))


def test_hashing_digests_saved_for_a_later_process(target, tmp_path):
    """A fresh hpcckpt process compares with the digests an earlier one saved."""
    buf = target.alloc(128)
    t = HashingTracker()
    arm(t, target)
    target.write(buf + 3 * PAGE)
    collect(t, target)
    t.save(tmp_path / "digests.npz")
    t.disarm()
    target.write(buf + 100 * PAGE, 4)
    later = HashingTracker.load(tmp_path / "digests.npz", target.pid)
    assert pages(collect(later, target), buf) == {100, 101, 102, 103}
    later.disarm()
    (tmp_path / "bad.npz").write_bytes(b"not digests")
    with pytest.raises(TrackingLostError, match="bad.npz"):
        HashingTracker.load(tmp_path / "bad.npz", target.pid)


def test_collect_needs_arm_on_that_process(target):
    t = HashingTracker()
    with pytest.raises(TrackingLostError, match="full dump"):
        t.collect(target.pid, proc.maps(target.pid))
    arm(t, target)
    with pytest.raises(TrackingLostError, match=str(target.pid)):
        t.collect(1, [])
    t.disarm()


def test_select():
    names = available_backends()
    assert "hashing" in names
    assert names == [r.name for r in probe() if r.works]
    assert choose().name == names[0]
    with pytest.raises(TrackingError, match="unknown"):
        choose("nonsense")
    for r in probe():
        if not r.works:
            with pytest.raises(TrackingError, match=r.name):
                choose(r.name)

"""smaps read before the freeze (engine/layout.py early_maps): the layout is compared while
frozen, a mapping re-created meanwhile is armed again, and VmFlags that madvise changed
between the read and the freeze end up in the image as they were (or became), never as
the stale read said. The race window is made certain by handing dump the read taken
before the job's madvise."""
import pytest

from hpcckpt.engine import dump as dump_mod
from hpcckpt.engine.freeze import freeze
from hpcckpt.engine.wpsnapshot import WpSnapshot
from hpcckpt.images.imageset import ImageSet
from hpcckpt.kernel import proc
from tests.tracking.helpers import PAGE, Target

MADV_DONTDUMP, MADV_WIPEONFORK = 16, 18


@pytest.fixture
def target():
    t = Target()
    yield t
    t.close()


def _flags(pid: int, addr: int) -> list[str]:
    return next(v.vmflags for v in proc.maps(pid) if v.start <= addr < v.end)


def test_maps_since_carries_smaps_fields_of_the_same_layout_only(target):
    a = target.alloc(64)
    before = proc.maps(target.pid)
    now = proc.maps_since(target.pid, before)
    assert now is not None
    assert [(v.start, v.end, v.vmflags, v.anon_kb) for v in now] == \
        [(v.start, v.end, v.vmflags, v.anon_kb) for v in before]
    assert next(v for v in now if v.start == a).anon_kb == 64 * PAGE // 1024
    target.alloc(16, huge=True)           # a new mapping (unlike its neighbours: not merged)
    assert proc.maps_since(target.pid, before) is None
    before = proc.maps(target.pid)
    assert target.cmd(f"g {a:x} 64 32") == f"{a:x}"    # shrunk in place: flags kept, counts not
    v = next(v for v in proc.maps_since(target.pid, before) if v.start == a)
    assert v.end == a + 32 * PAGE and v.vmflags and v.anon_kb == 0


def test_mapping_recreated_after_prearm_is_registered_again(target):
    a = target.alloc(64)
    s = WpSnapshot.prearm(target.pid)
    try:
        assert (a, a + 64 * PAGE) in s._pre and "uw" in _flags(target.pid, a)
        target.cmd(f"f {a:x} 64")         # munmap + mmap at the same place: maps looks the same
        with s._lock:                     # the loop thread has handled the unmap event
            assert (a, a + 64 * PAGE) not in s._pre
        assert "uw" not in _flags(target.pid, a)
        fr = freeze(target.pid)
        try:
            s.protect(proc.maps(target.pid, with_flags=False))
        finally:
            fr.thaw()
        assert "uw" in _flags(target.pid, a) and s.covers(a)
    finally:
        s.close()


def _page(images, pid: int, addr: int) -> bytes:
    iset = ImageSet(images)
    pm = iset.pagemap(pid)
    for r in pm.runs:
        if r.vaddr <= addr < r.vaddr + r.nr_pages * PAGE and not r.in_parent:
            with open(iset.path / pm.pages_file, "rb") as f:
                f.seek(r.offset + addr - r.vaddr)
                return f.read(PAGE)
    raise AssertionError(f"page {addr:#x} not in the image")


@pytest.mark.parametrize("route, advice, flag", [("uffd", MADV_DONTDUMP, "dd"), ("fork", MADV_WIPEONFORK, "wf")])
def test_madvise_between_the_read_and_the_freeze(tmp_path, target, monkeypatch, route, advice, flag):
    a = target.alloc(64)
    target.write(a, 64)
    stale = proc.maps(target.pid)
    assert target.cmd(f"m {a:x} 64 {advice}") == "ok"
    monkeypatch.setattr(dump_mod, "early_maps", lambda pid, tree: {target.pid: stale})
    r = dump_mod.dump(target.pid, tmp_path / "img", live=True, live_route=route, show_progress=False)
    assert r.live_route == route, r.notes
    vma = next(v for v in ImageSet(tmp_path / "img").process(target.pid).mm.vmas if v.start == a)
    assert flag in vma.vmflags
    if route == "uffd":                   # seen after the thaw, said
        assert any("madvise flags" in n and f"{a:#x}" in n for n in r.notes), r.notes
    with open(f"/proc/{target.pid}/mem", "rb") as mem:
        for k in (0, 31, 63):             # a wipe-on-fork mapping's pages are not read from the fork
            mem.seek(a + k * PAGE)
            assert _page(tmp_path / "img", target.pid, a + k * PAGE) == mem.read(PAGE)

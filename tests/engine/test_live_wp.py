"""Live snapshots by write-protect (engine/wpsnapshot.py) and by fork, of threads writing
without pause: the image is one instant (the restored program checks every page against
its own sweep counters and finishes with the uninterrupted run's digest), the job runs on
unharmed, and a dumping process killed mid-copy leaves it running, not hung."""
import signal
import subprocess
import sys
import time

import pytest

from hpcckpt.engine import wpsnapshot
from hpcckpt.engine.dump import dump
from hpcckpt.engine.incremental import TreeTracker
from hpcckpt.engine.precopy import PreCopy
from tests.tracking.helpers import PAGE, Target, build

from .helpers import Job, cli, reference, restore_fg


@pytest.fixture(scope="module")
def writer():
    return build("livewriter")


def _job(writer, tmp_path, threads=4, pages=2048, sweeps=12000):
    cmd = [writer, threads, pages, sweeps]
    ref = reference(cmd, tmp_path / "ref.txt")
    job = Job.start(cmd, tmp_path / "out.txt")
    job.wait_lines(1)
    time.sleep(0.2)             # the writers are sweeping
    return job, ref


def _finishes_exactly(job, ref, images):
    assert job.proc.wait(timeout=120) == 0          # the job ran on, unharmed
    assert job.out.read_bytes() == ref
    res = restore_fg(images, check=False)
    assert res.returncode == 0, (res.stderr, job.out.read_bytes())
    assert job.out.read_bytes() == ref


@pytest.mark.parametrize("route", ["uffd", "fork"])
def test_live_snapshot_of_writing_threads_is_one_instant(tmp_path, writer, route):
    job, ref = _job(writer, tmp_path)
    try:
        r = dump(job.pid, tmp_path / "live", live=True, show_progress=False, live_route=route)
        assert r.live_route == route, r.notes
        _finishes_exactly(job, ref, tmp_path / "live")
    finally:
        job.kill()


def test_live_incremental_chain_restores_exactly(tmp_path, writer):
    """Full dump (tracking armed), then live incremental dumps against it: with the
    caller's tracker (its async uffd holds the mappings) and by digests (a fresh caller:
    write-protect route); each restores to the uninterrupted output."""
    job, ref = _job(writer, tmp_path, sweeps=30000)
    try:
        tt = TreeTracker()
        dump(job.pid, tmp_path / "full", leave_running=True, tracker=tt, track_mem=True, show_progress=False)
        a = dump(job.pid, tmp_path / "inc1", live=True, parent=tmp_path / "full", tracker=tt,
                 show_progress=False)
        assert a.incremental and a.tracking == "uffd-wp", a.notes
        tt.close()                                  # its async uffd held every mapping
        b = dump(job.pid, tmp_path / "inc2", live=True, parent=tmp_path / "full", live_route="uffd",
                 show_progress=False)
        assert b.incremental and b.live_route == "uffd", b.notes
        assert job.proc.wait(timeout=120) == 0
        assert job.out.read_bytes() == ref
        for img in ("inc1", "inc2"):
            res = restore_fg(tmp_path / img, check=False)
            assert res.returncode == 0, (img, res.stderr, job.out.read_bytes())
            assert job.out.read_bytes() == ref, img
    finally:
        job.kill()


KILLED_MID_COPY = """
import os, signal, sys
from hpcckpt.engine import wpsnapshot
from hpcckpt.engine.dump import dump
slices = wpsnapshot._slices
def dying(runs):
    for i, piece in enumerate(slices(runs)):
        if i == 3:
            print("killing", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        yield piece
wpsnapshot._slices = dying
dump(int(sys.argv[1]), sys.argv[2], live=True, live_route="uffd", show_progress=False)
"""


def test_dumping_process_killed_mid_copy_leaves_the_job_running(tmp_path, writer):
    """The dumping process dies while pages are protected and writers wait on it: its
    userfaultfd closes, the kernel wakes them and drops the protection."""
    job, ref = _job(writer, tmp_path)
    try:
        res = subprocess.run([sys.executable, "-c", KILLED_MID_COPY, str(job.pid), str(tmp_path / "img")],
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == -signal.SIGKILL and "killing" in res.stdout, res.stderr
        assert job.proc.wait(timeout=120) == 0
        assert job.out.read_bytes() == ref
    finally:
        job.kill()


@pytest.mark.parametrize("leave_running", [False, True], ids=["killed", "left-running"])
def test_final_dump_after_pre_dump_with_writing_threads_restores_exactly(tmp_path, writer, leave_running,
                                                                         monkeypatch):
    """pre-dump (tracking handed to a holder), then the final dump: copy rounds while the
    threads write (made although they do not pay here), the last changes while frozen;
    the image is the state at that freeze. Left running, the threads rewrite all their
    pages faster than the rounds copy: the dump forks instead (as without rounds), with
    every change the rounds saw."""
    monkeypatch.setattr(PreCopy, "_rounds_pay", lambda self, notes: True)
    job, ref = _job(writer, tmp_path, sweeps=30000)
    try:
        cli("-q", "pre-dump", "--pid", job.pid, "--images", tmp_path / "pre")
        r = dump(job.pid, tmp_path / "fin", parent=tmp_path / "pre", leave_running=leave_running,
                 show_progress=False)
        assert r.incremental and r.tracking == "uffd-wp", r.notes
        assert r.precopy_rounds and r.snapshot == leave_running, (r.precopy_rounds, r.notes)
        rc = job.proc.wait(timeout=120)              # killed by the dump, or finished
        assert rc == 0 or not leave_running
        res = restore_fg(tmp_path / "fin", check=False)
        assert res.returncode == 0, (res.stderr, job.out.read_bytes())
        assert job.out.read_bytes() == ref
    finally:
        job.kill()


@pytest.mark.parametrize("route", ["auto", "uffd"])
def test_memory_dropped_before_it_was_copied_fails_the_snapshot_or_forks(tmp_path, monkeypatch, route):
    """The job drops (MADV_DONTNEED) pages the write-protect snapshot has not copied yet:
    their content at the instant is gone, so that snapshot must fail, never be written;
    left to choose the route, the dump takes it again by fork."""
    t = Target()
    try:
        buf = t.alloc(4096)                       # 16 MiB: 16 slices of copy
        t.write(buf, 4096)
        slices = wpsnapshot._slices

        def dropping(runs):
            for i, piece in enumerate(slices(runs)):
                if i == 2 and len(runs) > 4:
                    t.cmd(f"d {buf + 4000 * PAGE:x} 8")    # pages far ahead of the copier
                yield piece
        monkeypatch.setattr(wpsnapshot, "_slices", dropping)
        if route == "uffd":
            with pytest.raises(wpsnapshot.SnapshotLostError, match=f"process {t.pid}"):
                dump(t.pid, tmp_path / "img", live=True, live_route=route, show_progress=False)
            assert not (tmp_path / "img").exists()
            assert t.cmd(f"w {buf:x} 1 1") == "ok"          # running, not frozen
        else:
            r = dump(t.pid, tmp_path / "img", live=True, show_progress=False)
            assert r.live_route == "fork" and "taken again by the fork route" in r.notes[0], r.notes
    finally:
        t.close()


def test_pre_copy_rounds_only_where_they_pay(tmp_path, writer):
    """32 MiB changed since the pre-dump by a job now idle: rounds copy it while it
    waits. Threads rewriting their 32 MiB without pause: a round finds it all again, so
    the rounds stop (more would only let them change more before the freeze: a busy
    machine may let one more through) and the freeze takes the rest; the image is exact."""
    t = Target()
    try:
        buf = t.alloc(8192)
        t.write(buf, 8192)
        cli("-q", "pre-dump", "--pid", t.pid, "--images", tmp_path / "pre")
        t.write(buf, 8192)
        r = dump(t.pid, tmp_path / "fin", parent=tmp_path / "pre", leave_running=True, show_progress=False)
        assert r.precopy_rounds and r.precopy_rounds[0] >= 8192 * PAGE, (r.precopy_rounds, r.notes)
    finally:
        t.close()
    (tmp_path / "busy").mkdir()
    job, ref = _job(writer, tmp_path / "busy", threads=2, pages=4096, sweeps=30000)
    try:
        cli("-q", "pre-dump", "--pid", job.pid, "--images", tmp_path / "busy" / "pre")
        r = dump(job.pid, tmp_path / "busy" / "fin", parent=tmp_path / "busy" / "pre", show_progress=False)
        assert r.incremental and 1 <= len(r.precopy_rounds) <= 2, (r.precopy_rounds, r.notes)
        job.proc.wait(timeout=30)
        res = restore_fg(tmp_path / "busy" / "fin", check=False)
        assert res.returncode == 0, (res.stderr, job.out.read_bytes())
        assert job.out.read_bytes() == ref
    finally:
        job.kill()


def test_pre_copy_round_failing_falls_back_to_digests(tmp_path, monkeypatch):
    """A collect that fails during the rounds may have re-protected pages it never
    reported: that tracker is dropped and the final dump compares page digests, so the
    pages written since the pre-dump are all in the image (not taken from the parent)."""
    from hpcckpt.errors import KernelError
    from hpcckpt.tracking.uffd_wp import UffdWpTracker
    from .test_incremental import written
    t = Target()
    try:
        buf = t.alloc(512)
        t.write(buf, 512)
        cli("-q", "pre-dump", "--pid", t.pid, "--images", tmp_path / "pre")
        wrote = {3, 4, 100, 511}
        for i in wrote:
            t.write(buf + i * PAGE)
        collect, calls = UffdWpTracker.collect, []

        def failing(self, pid, vmas):
            calls.append(pid)
            out = collect(self, pid, vmas)         # reports and re-protects, then "fails"
            if len(calls) == 1:
                raise KernelError("PAGEMAP_SCAN failed half-way (test)")
            return out
        monkeypatch.setattr(UffdWpTracker, "collect", failing)
        monkeypatch.setattr(PreCopy, "_rounds_pay", lambda self, notes: True)   # 4 pages: rounds forced
        r = dump(t.pid, tmp_path / "fin", parent=tmp_path / "pre", leave_running=True, show_progress=False)
        assert any("pre-copy round failed" in n for n in r.notes), r.notes
        assert r.tracking == "hashing", r.notes
        assert wrote <= written(tmp_path / "fin", t.pid, buf, buf + 512 * PAGE)
    finally:
        t.close()


@pytest.mark.parametrize("kept", [False, True], ids=["against-the-parent", "caller-tracker"])
def test_digests_are_compared_on_a_fork_after_the_thaw(tmp_path, kept):
    """An incremental dump by content hashing that lets the job run on reads the pages
    to digest from a fork after the thaw, not while the job is frozen: still exactly
    the pages written since the parent, at the frozen instant; a caller's hashing
    tracker keeps the fork's digests for the next dump."""
    from .test_incremental import written
    t = Target()
    tt = TreeTracker(backend="hashing") if kept else None
    try:
        buf = t.alloc(512)
        t.write(buf, 512)
        prev = tmp_path / "full"
        dump(t.pid, prev, leave_running=True, tracker=tt, show_progress=False)
        for k, wrote in enumerate(({3, 4, 100, 511}, {5, 200})):
            for i in wrote:
                t.write(buf + i * PAGE)
            img = tmp_path / f"inc{k}"
            r = dump(t.pid, img, leave_running=True, parent=prev, tracker=tt, show_progress=False)
            assert r.tracking == "hashing" and r.snapshot, (r.tracking, r.notes)
            assert "digests from the snapshot copies" in r.spans, r.spans
            assert written(img, t.pid, buf, buf + 512 * PAGE) == wrote
            prev = img
    finally:
        if tt:
            tt.close()
        t.close()

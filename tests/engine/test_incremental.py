"""Incremental checkpoints on real processes: exactly the written pages are written, chains
restore to the uninterrupted result, broken parents are named, pre-dump and live
snapshots, and `hpcckpt run` chaining across a kill and resume."""
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hpcckpt.engine.dump import dump
from hpcckpt.engine.incremental import TreeTracker
from hpcckpt.engine.memory import PageWriter
from hpcckpt.engine.merge import merge
from hpcckpt.engine.restore import restore
from hpcckpt.errors import HpcckptError
from hpcckpt.images.imageset import ImageSet
from hpcckpt.kernel import proc
from hpcckpt.tracking.base import start_time
from hpcckpt.tracking.holder import HolderRecord
from tests.tracking.helpers import Target

from .helpers import PROGRAMS, Job, cli, pid_alive, reference, restore_fg

PAGE = 4096
CHAIN = [sys.executable, PROGRAMS / "chainwork.py"]


def written(img: Path, pid: int, start: int, end: int) -> set[int]:
    """Page indices of [start, end) the image wrote itself (not in parent)."""
    out = set()
    for r in ImageSet(img).pagemap(pid).runs:
        if not r.in_parent:
            out |= {(r.vaddr - start) // PAGE + k for k in range(r.nr_pages)
                    if start <= r.vaddr + k * PAGE < end}
    return out


@pytest.mark.parametrize("live_tracker", [True, False], ids=["uffd-wp", "hashing"])
def test_incremental_image_holds_exactly_the_written_pages(tmp_path, live_tracker):
    t = Target()
    try:
        base = t.alloc(512)
        tt = TreeTracker() if live_tracker else None
        dump(t.pid, tmp_path / "c1", leave_running=True, tracker=tt, show_progress=False)
        wrote = {3, 4, 5, 100, 300, 511}
        for i in wrote:
            t.write(base + i * PAGE)
        r = dump(t.pid, tmp_path / "c2", leave_running=True, tracker=tt, parent=tmp_path / "c1",
                 show_progress=False)
        assert r.incremental and r.tracking == ("uffd-wp" if live_tracker else "hashing")
        assert written(tmp_path / "c2", t.pid, base, base + 512 * PAGE) == wrote
        inv = ImageSet(tmp_path / "c2").inventory()
        assert inv.parent == "../c1" and inv.parent_id == ImageSet(tmp_path / "c1").inventory().image_id
        assert r.pages_bytes < 64 * PAGE + len(wrote) * PAGE   # stack, libc data, ... and those
        t.cmd(f"d {base + 10 * PAGE:x} 2")        # dropped pages: listed nowhere
        r = dump(t.pid, tmp_path / "c3", leave_running=True, tracker=tt, parent=tmp_path / "c2",
                 show_progress=False)
        listed = set()
        for run in ImageSet(tmp_path / "c3").pagemap(t.pid).runs:
            listed |= {(run.vaddr - base) // PAGE + k for k in range(run.nr_pages)}
        assert {10, 11}.isdisjoint(listed) and {9, 12, 3} <= listed
        if tt:
            tt.close()
    finally:
        t.p.kill()
        t.p.wait()


def _chain(tmp_path, n, job, **kw):
    tt = TreeTracker()
    imgs, lines = [], 3
    for i in range(n):
        job.wait_lines(lines)
        img = tmp_path / f"c{i}"
        r = dump(job.pid, img, leave_running=True, tracker=tt, parent=imgs[-1] if imgs else None,
                 show_progress=False, **kw)
        assert r.incremental == bool(imgs)
        imgs.append(img)
        lines += 3
    tt.close()
    return imgs


def test_chain_of_ten_each_restores_to_the_uninterrupted_result(tmp_path):
    """A numpy computation checkpointed 10 times, each incremental on the one before:
    restoring from any one of the 10 finishes with the uninterrupted run's output."""
    cmd = CHAIN + [40, 0.05]
    ref = reference(cmd, tmp_path / "ref.txt")
    job = Job.start(cmd, tmp_path / "out.txt")
    imgs = _chain(tmp_path, 10, job)
    job.kill()
    invs = [ImageSet(i).inventory() for i in imgs]
    assert [i.chain_depth for i in invs] == list(range(10))
    assert all(i.tracking == "uffd-wp" for i in invs[1:])
    for img in imgs:      # each restore cuts the output back to its size at the checkpoint
        assert restore_fg(img).returncode == 0, img
        assert job.out.read_bytes() == ref, f"restored from {img.name}"
    merge(imgs[-1], tmp_path / "merged")            # what store.compact's merge_fn builds
    inv = ImageSet(tmp_path / "merged").inventory()
    assert not inv.parent and inv.image_id == invs[-1].image_id
    shutil.rmtree(imgs[0])                           # standalone: needs no parent
    assert restore_fg(tmp_path / "merged").returncode == 0
    assert job.out.read_bytes() == ref


def _wait_bytes(out: Path, n: int, pid: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while out.read_bytes().count(b"\n") < n:
        assert time.monotonic() < deadline and pid_alive(pid), f"no {n} lines from {pid}"
        time.sleep(0.02)


def test_restored_then_checkpointed_chain_restores_to_the_uninterrupted_result(tmp_path):
    """Restore image k with tracking re-armed, checkpoint the restored job incrementally
    against image k (twice), restore the newest: the uninterrupted result again."""
    cmd = CHAIN + [40, 0.05]
    ref = reference(cmd, tmp_path / "ref.txt")
    job = Job.start(cmd, tmp_path / "out.txt")
    imgs = _chain(tmp_path, 4, job)
    job.kill()
    tt = TreeTracker()
    r = restore(imgs[2], show_progress=False, tracker=tt)
    assert tt.valid_for(ImageSet(imgs[2]).inventory().image_id) and tt.name == "uffd-wp"
    try:
        parent, lines = imgs[2], 12
        for k in range(2):
            _wait_bytes(job.out, lines, r.pid)
            d = dump(r.pid, tmp_path / f"r{k}", leave_running=True, tracker=tt, parent=parent,
                     show_progress=False)
            assert d.incremental and d.tracking == "uffd-wp", d.notes
            assert d.pages_bytes < d.parent_bytes    # 1-50% of the buffer rewritten per step
            parent, lines = tmp_path / f"r{k}", lines + 4
    finally:
        tt.close()
        os.kill(r.pid, signal.SIGKILL)
        os.waitpid(r.pid, 0)
    assert ImageSet(parent).inventory().chain_depth == 4
    assert restore_fg(parent).returncode == 0
    assert job.out.read_bytes() == ref


def test_tracking_lost_when_someone_else_restarted_the_job(tmp_path):
    """The job was killed and restored by someone else between two checkpoints, with the
    same PID: the tracker's state describes the old incarnation. The dump says so, compares
    page digests with the parent instead, arms tracking again, and nothing is lost."""
    cmd = CHAIN + [30, 0.05]
    ref = reference(cmd, tmp_path / "ref.txt")
    job = Job.start(cmd, tmp_path / "out.txt")
    tt = TreeTracker()
    job.wait_lines(3)
    dump(job.pid, tmp_path / "c0", leave_running=True, tracker=tt, show_progress=False)
    job.kill()
    r = restore(tmp_path / "c0", show_progress=False)       # not through our tracker
    assert r.pid == job.pid
    try:
        _wait_bytes(job.out, 8, r.pid)
        d = dump(r.pid, tmp_path / "c1", leave_running=True, tracker=tt, parent=tmp_path / "c0",
                 show_progress=False)
        assert d.tracking == "hashing" and any("restarted" in n for n in d.notes), d.notes
        assert pid_alive(r.pid) and proc_state(r.pid) != "t"    # left running, not stopped
        _wait_bytes(job.out, 12, r.pid)
        d = dump(r.pid, tmp_path / "c2", leave_running=True, tracker=tt, parent=tmp_path / "c1",
                 show_progress=False)
        assert d.tracking == "uffd-wp" and not d.notes       # armed again on the new one
    finally:
        tt.close()
        os.kill(r.pid, signal.SIGKILL)
        os.waitpid(r.pid, 0)
    for img in ("c1", "c2"):
        assert restore_fg(tmp_path / img).returncode == 0
        assert job.out.read_bytes() == ref, img


def proc_state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0].lower()


def _break_uffd(t) -> None:
    """The userfaultfd closed under the tracker: /dev/null takes its fd number, the kernel
    releases the uffd and with it every write-protect registration in the target."""
    null = os.open("/dev/null", os.O_RDONLY)
    os.dup2(null, t.fd)
    os.close(null)


def _break_scan(t) -> None:
    """The tracker's /proc/PID/pagemap replaced by /dev/null: PAGEMAP_SCAN fails (ENOTTY)."""
    null = os.open("/dev/null", os.O_RDONLY)
    os.dup2(null, t.scanner.fd)
    os.close(null)


@pytest.mark.parametrize("how", ["uffd-closed", "scan-fails", "unregistrable-mapping"])
def test_backend_failing_midway_loses_nothing(tmp_path, how):
    """uffd-wp fails between checkpoints, for real: its userfaultfd is gone, PAGEMAP_SCAN
    fails, or the job maps memory userfaultfd refuses (MAP_DROPPABLE). Each time a note
    says what happened, the next backend (content hashing: for the whole process, or for
    that mapping) decides what to write, and every image restores to the exact result."""
    drop = how == "unregistrable-mapping"
    cmd = [sys.executable, Path(__file__).parent.parent / "tracking" / "programs" / "dropwork.py",
           30, 0.05] + ([4] if drop else [])
    ref = reference(cmd, tmp_path / "ref.txt")
    job = Job.start(cmd, tmp_path / "out.txt")
    tt = TreeTracker()
    try:
        job.wait_lines(3)
        dump(job.pid, tmp_path / "c0", leave_running=True, tracker=tt, show_progress=False)
        t = tt.trackers[job.pid]
        if how == "uffd-closed":
            _break_uffd(t)
        elif how == "scan-fails":
            _break_scan(t)
        job.wait_lines(7)
        d = dump(job.pid, tmp_path / "c1", leave_running=True, tracker=tt, parent=tmp_path / "c0",
                 show_progress=False)
        if drop:   # only the refused mapping is hashed; the rest stays write-protect tracked
            assert d.tracking == "uffd-wp"
            assert any("cannot be registered for write-protect" in n for n in d.notes), d.notes
            assert tt.trackers[job.pid].fallback_starts
        else:
            want = "userfaultfd (fd" if how == "uffd-closed" else "PAGEMAP_SCAN"
            assert d.tracking == "hashing" and any(want in n for n in d.notes), d.notes
        assert proc_state(job.pid) not in ("t", "z")
        job.wait_lines(11)
        d = dump(job.pid, tmp_path / "c2", leave_running=True, tracker=tt, parent=tmp_path / "c1",
                 show_progress=False)
        assert d.incremental and d.tracking == "uffd-wp", d.notes
    finally:
        tt.close()
        job.kill()
    for img in ("c2", "c1"):
        assert restore_fg(tmp_path / img).returncode == 0
        assert job.out.read_bytes() == ref, img


def test_missing_or_damaged_parent_is_named(tmp_path):
    job = Job.start(CHAIN + [200, 0.02], tmp_path / "out.txt")
    imgs = _chain(tmp_path, 3, job)
    job.kill()
    pages = next(imgs[1].glob("pages-*.img"))
    data = bytearray(pages.read_bytes())
    data[5] ^= 0xFF
    pages.write_bytes(data)
    res = cli("restore", "--images", imgs[2], check=False)
    assert res.returncode != 0 and f"parent image {imgs[1]}" in res.stderr and "damaged" in res.stderr
    shutil.rmtree(imgs[1])
    res = cli("restore", "--images", imgs[2], check=False)
    assert res.returncode != 0 and "parent image ../c1" in res.stderr and "missing" in res.stderr
    # a fresh dump against a missing parent is refused before the process is touched
    with pytest.raises(HpcckptError, match="c1"):
        dump(os.getpid(), tmp_path / "x", parent=imgs[1], leave_running=True)


def test_cli_dump_track_mem_then_parent(tmp_path):
    """`dump -R --track-mem` leaves tracking armed (a holder keeps it) and saves digests
    (the fallback when the holder is gone: see the stale-record test below)."""
    cmd = CHAIN + [60, 0.05]
    ref = reference(cmd, tmp_path / "ref.txt")
    job = Job.start(cmd, tmp_path / "out.txt")
    job.wait_lines(3)
    cli("dump", "--pid", job.pid, "--images", tmp_path / "a", "--leave-running", "--track-mem")
    assert list((tmp_path / "a").glob("digests-*.npz"))
    job.wait_lines(8)
    res = cli("dump", "--pid", job.pid, "--images", tmp_path / "b", "--parent", tmp_path / "a")
    assert "in parent images (uffd-wp)" in res.stderr, res.stderr
    job.proc.wait(timeout=10)
    assert restore_fg(tmp_path / "b").returncode == 0
    assert job.out.read_bytes() == ref


def test_pre_dump_then_dump(tmp_path):
    cmd = CHAIN + [60, 0.05, 16]
    ref = reference(cmd, tmp_path / "ref.txt")
    job = Job.start(cmd, tmp_path / "out.txt")
    job.wait_lines(3)
    tt = TreeTracker()
    pre = dump(job.pid, tmp_path / "pre", pre_dump=True, tracker=tt, show_progress=False)
    assert ImageSet(tmp_path / "pre").inventory().pre_dump
    assert pre.pages_bytes >= 16 << 20
    fin = dump(job.pid, tmp_path / "fin", parent=tmp_path / "pre", tracker=tt, show_progress=False)
    assert fin.incremental and fin.tracking == "uffd-wp" and fin.pages_bytes < pre.pages_bytes
    job.proc.wait(timeout=10)
    res = cli("restore", "--images", tmp_path / "pre", check=False)
    assert res.returncode != 0 and "pre-dump" in res.stderr
    assert restore_fg(tmp_path / "fin").returncode == 0
    assert job.out.read_bytes() == ref


def _gone(pid: int, timeout: float = 5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if start_time(pid) is None:        # exited (maybe a zombie until init reaps it)
            return True
        time.sleep(0.05)
    return False


def test_cli_pre_dump_hands_tracking_to_the_final_dump(tmp_path):
    """One-shot `hpcckpt pre-dump` then `hpcckpt dump --parent`: the tracking armed by the
    first survives it (a holder process keeps the userfaultfd; the target gets no fd), and
    the final dump writes exactly the pages written since (uffd-wp, not hashing), then
    stops the holder."""
    t = Target()
    try:
        base = t.alloc(4096)
        fds = sorted(os.listdir(f"/proc/{t.pid}/fd"))
        cli("pre-dump", "--pid", t.pid, "--images", tmp_path / "pre")
        rec = HolderRecord.read(tmp_path / "pre")
        assert rec is not None and start_time(rec.holder_pid) == rec.holder_start
        assert sorted(os.listdir(f"/proc/{t.pid}/fd")) == fds
        assert any("uw" in v.vmflags for v in proc.maps(t.pid))     # still write-protect armed
        wrote = {5, 6, 100, 2047, 4000}
        for i in wrote:
            t.write(base + i * PAGE)
        res = cli("dump", "--pid", t.pid, "--images", tmp_path / "fin", "--parent", tmp_path / "pre")
        assert "in parent images (uffd-wp)" in res.stderr, res.stderr
        assert written(tmp_path / "fin", t.pid, base, base + 4096 * PAGE) == wrote
        pm = ImageSet(tmp_path / "fin").pagemap(t.pid)
        assert pm.pages_bytes < (len(wrote) + 64) * PAGE        # those, plus stack and libc data
        assert pm.parent_bytes >= 4096 * PAGE
        assert _gone(rec.holder_pid)                               # taken over: stopped
        assert t.p.wait(timeout=10) == -signal.SIGKILL             # the final dump killed it
    finally:
        t.close()


def test_tracking_holder_exits_with_its_process_and_a_stale_record_is_named(tmp_path):
    t = Target()
    try:
        t.alloc(256)
        cli("pre-dump", "--pid", t.pid, "--images", tmp_path / "pre")
        rec = HolderRecord.read(tmp_path / "pre")
        assert start_time(rec.holder_pid) is not None
        t.cmd("x")
        t.p.wait()
        assert _gone(rec.holder_pid)
    finally:
        t.close()
    cmd = CHAIN + [80, 0.05]   # runs 4 s: the dump below must find it alive
    ref = reference(cmd, tmp_path / "ref.txt")
    job = Job.start(cmd, tmp_path / "out.txt")
    job.wait_lines(3)
    cli("pre-dump", "--pid", job.pid, "--images", tmp_path / "p2")
    rec = HolderRecord.read(tmp_path / "p2")
    os.kill(rec.holder_pid, signal.SIGKILL)                       # someone killed the holder
    assert _gone(rec.holder_pid)
    job.wait_lines(6)
    res = cli("dump", "--pid", job.pid, "--images", tmp_path / "f2", "--parent", tmp_path / "p2")
    assert f"tracking holder {rec.holder_pid} is gone" in res.stderr, res.stderr
    assert "in parent images (hashing)" in res.stderr
    job.proc.wait(timeout=10)
    assert restore_fg(tmp_path / "f2").returncode == 0
    assert job.out.read_bytes() == ref


def test_cli_tracking_lost_when_the_job_was_restarted_after_pre_dump(tmp_path):
    """pre-dump, then someone kills and restores the job (same PID): the holder tracked the
    old process and has gone with it; the final dump says so, compares digests, and the
    image restores to the uninterrupted result."""
    cmd = CHAIN + [30, 0.05]
    ref = reference(cmd, tmp_path / "ref.txt")
    job = Job.start(cmd, tmp_path / "out.txt")
    job.wait_lines(3)
    cli("dump", "--pid", job.pid, "--images", tmp_path / "c0", "-R", "--track-mem")
    rec = HolderRecord.read(tmp_path / "c0")
    job.kill()
    r = restore(tmp_path / "c0", show_progress=False)
    assert r.pid == job.pid
    try:
        _wait_bytes(job.out, 6, r.pid)
        res = cli("dump", "--pid", r.pid, "--images", tmp_path / "c1", "--parent", tmp_path / "c0", "-R")
        # the holder noticed the exit (or, if not yet, the start time tells the new process)
        assert (f"tracking holder {rec.holder_pid} is gone" in res.stderr
                or "was of another process" in res.stderr), res.stderr
        assert "in parent images (hashing)" in res.stderr
    finally:
        os.kill(r.pid, signal.SIGKILL)
        os.waitpid(r.pid, 0)
    assert restore_fg(tmp_path / "c1").returncode == 0
    assert job.out.read_bytes() == ref


def test_cli_pre_dump_of_a_process_tree(tmp_path):
    """A multiprocessing pool (3 processes): one holder keeps the tracking of all of them,
    the final dump takes it over for each, and the tree restores to the exact output."""
    cmd = [sys.executable, PROGRAMS / "pool.py", 120, 0.05]
    ref = reference(cmd, tmp_path / "ref.txt")
    job = Job.start(cmd, tmp_path / "out.txt")
    job.wait_lines(10)
    cli("pre-dump", "--pid", job.pid, "--images", tmp_path / "pre")
    rec = HolderRecord.read(tmp_path / "pre")
    assert sorted(p.ns_pid for p in rec.processes) == sorted(ImageSet(tmp_path / "pre").inventory().pids)
    assert len(rec.processes) == 3
    job.wait_lines(20)
    res = cli("dump", "--pid", job.pid, "--images", tmp_path / "fin", "--parent", tmp_path / "pre")
    assert "(uffd-wp)" in res.stderr and "hpcckpt:" not in res.stderr, res.stderr   # no fallback note
    assert _gone(rec.holder_pid)
    job.proc.wait(timeout=10)
    deadline = time.monotonic() + 10           # the killed workers are init's to reap
    while any(os.path.exists(f"/proc/{p.host_pid}") for p in rec.processes):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert restore_fg(tmp_path / "fin").returncode == 0
    assert job.out.read_bytes() == ref


def test_cli_pre_dump_and_dump_restore_to_the_uninterrupted_result(tmp_path):
    cmd = CHAIN + [60, 0.05, 16]
    ref = reference(cmd, tmp_path / "ref.txt")
    job = Job.start(cmd, tmp_path / "out.txt")
    job.wait_lines(3)
    cli("pre-dump", "--pid", job.pid, "--images", tmp_path / "pre")
    job.wait_lines(6)
    res = cli("dump", "--pid", job.pid, "--images", tmp_path / "fin", "--parent", tmp_path / "pre")
    assert "(uffd-wp)" in res.stderr, res.stderr
    job.proc.wait(timeout=10)
    assert restore_fg(tmp_path / "fin").returncode == 0
    assert job.out.read_bytes() == ref


def test_batched_page_copy_is_exact_also_across_unreadable_pages(tmp_path):
    """Scattered single pages are copied many per process_vm_readv; a batch that meets a
    page process_vm_readv cannot read (PROT_NONE) finishes through /proc/PID/mem."""
    t = Target()
    try:
        base = t.alloc(256)
        t.write(base, 128, 2)                              # distinct contents, even pages
        t.cmd(f"p {base + 100 * PAGE:x} 20 0")             # pages 100-119: PROT_NONE
        runs = [(base + i * PAGE, PAGE) for i in range(0, 256, 3)] + [(base + 250 * PAGE, 3 * PAGE)]
        fd = os.open(tmp_path / "pages.bin", os.O_WRONLY | os.O_CREAT, 0o600)
        w = PageWriter(t.pid, fd)
        offsets = w.copy_runs(runs)
        w.close()
        os.close(fd)
        assert offsets == sorted(offsets) and len(offsets) == len(runs)
        data = (tmp_path / "pages.bin").read_bytes()
        with open(f"/proc/{t.pid}/mem", "rb", buffering=0) as mem:
            for (addr, n), off in zip(runs, offsets):
                assert data[off:off + n] == os.pread(mem.fileno(), n, addr), hex(addr)
    finally:
        t.close()


def _children(pid: int) -> list[str]:
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(name)
    return out


def test_live_snapshot_is_one_instant_and_the_job_runs_on(tmp_path):
    cmd = CHAIN + [60, 0.05, 16]
    ref = reference(cmd, tmp_path / "ref.txt")
    job = Job.start(cmd, tmp_path / "out.txt")
    job.wait_lines(4)
    r = dump(job.pid, tmp_path / "live", live=True, show_progress=False)
    assert r.frozen_s < r.total_s
    assert _children(job.pid) == []          # the snapshot copy is gone, reaped
    assert job.proc.wait(timeout=60) == 0    # the job ran on, unharmed
    assert job.out.read_bytes() == ref
    assert restore_fg(tmp_path / "live").returncode == 0
    assert job.out.read_bytes() == ref


@pytest.mark.parametrize("advice", [10, 18], ids=["dontfork", "wipeonfork"])
def test_live_snapshot_copies_mappings_a_fork_does_not(tmp_path, advice):
    """MADV_DONTFORK memory is absent from the snapshot copy and MADV_WIPEONFORK memory is
    zeros there: both must be read from the target while it is frozen."""
    t = Target()
    try:
        buf = t.alloc(64)
        t.write(buf, 64)
        assert t.cmd(f"m {buf:x} 64 {advice}") == "ok"
        dump(t.pid, tmp_path / "live", live=True, show_progress=False)
        iset = ImageSet(tmp_path / "live")
        data = (tmp_path / "live" / iset.pagemap(t.pid).pages_file).read_bytes()
        with open(f"/proc/{t.pid}/mem", "rb", buffering=0) as mem:
            want = os.pread(mem.fileno(), 64 * PAGE, buf)
        got = bytearray(64 * PAGE)
        for r in iset.pagemap(t.pid).runs:
            lo, hi = max(r.vaddr, buf), min(r.vaddr + r.nr_pages * PAGE, buf + 64 * PAGE)
            if lo < hi:
                got[lo - buf:hi - buf] = data[r.offset + lo - r.vaddr:r.offset + hi - r.vaddr]
        assert bytes(got) == want
    finally:
        t.close()


def test_run_incremental_killed_and_resumed(tmp_path):
    cmd = CHAIN + [60, 0.05]
    ref = reference(cmd, tmp_path / "ref.txt")
    d, out, log = tmp_path / "imgs", tmp_path / "out.txt", tmp_path / "log.txt"
    run_cmd = [sys.executable, "-m", "hpcckpt.cli", "run", "--images", str(d), "--every", "0.4",
               "--full-every", "4", "--", *map(str, cmd)]

    def start():
        with open(out, "ab") as o, open(log, "ab") as e:
            return subprocess.Popen(run_cmd, stdout=o, stderr=e, start_new_session=True)

    def ckpts():
        return sorted(p.name for p in d.glob("ckpt-*") if (p / "inventory.img").exists())

    def latest():
        return os.readlink(d / "latest") if (d / "latest").is_symlink() else None

    run = start()
    deadline = time.monotonic() + 60
    # killed once the 5th (a full one) is the newest published: killed between writing it
    # and publishing it, the job resumes from the 4th (depth 3), whose successor is full
    while len(ckpts()) < 5 or latest() not in ckpts()[4:]:
        assert time.monotonic() < deadline and run.poll() is None, log.read_text()
        time.sleep(0.05)
    os.killpg(run.pid, signal.SIGKILL)
    run.wait()
    invs = {n: ImageSet(d / n).inventory() for n in ckpts()}
    assert [invs[n].chain_depth for n in ckpts()[:5]] == [0, 1, 2, 3, 0]     # --full-every 4
    resumed_from = os.readlink(d / "latest")
    before = set(ckpts())
    run = start()
    deadline = time.monotonic() + 60
    while not set(ckpts()) - before:
        assert time.monotonic() < deadline and run.poll() is None, log.read_text()
        time.sleep(0.05)
    first = min(set(ckpts()) - before)
    inv = ImageSet(d / first).inventory()
    assert inv.parent == f"../{resumed_from}" and inv.tracking == "uffd-wp"
    assert run.wait(timeout=120) == 0, log.read_text()
    assert out.read_bytes() == ref


def test_dump_left_running_copies_from_a_snapshot_after_the_thaw(tmp_path):
    """A dump that lets the job run on reads its pages from a copy-on-write fork after the
    thaw when that is cheaper than copying while frozen (a full dump always is): the
    image is still the frozen instant, and tracking stays exact across such dumps (the
    job's writes between the thaw and the copy land in the next incremental image)."""
    cmd = CHAIN + [100, 0.05, 24]
    ref = reference(cmd, tmp_path / "ref.txt")
    job = Job.start(cmd, tmp_path / "out.txt")
    job.wait_lines(4)
    tt = TreeTracker()
    try:
        full = dump(job.pid, tmp_path / "full", leave_running=True, tracker=tt, show_progress=False)
        assert full.snapshot and full.frozen_s < full.total_s, full.spans
        assert _children(job.pid) == []          # the snapshot copy is gone, reaped
        job.wait_lines(6)
        forked = dump(job.pid, tmp_path / "inc1", leave_running=True, tracker=tt, parent=tmp_path / "full",
                      cow=True, show_progress=False)
        assert forked.snapshot and forked.incremental and forked.tracking == "uffd-wp"
        job.wait_lines(8)
        frozen = dump(job.pid, tmp_path / "inc2", leave_running=True, tracker=tt, parent=tmp_path / "inc1",
                      cow=False, show_progress=False)
        assert not frozen.snapshot and frozen.incremental and frozen.tracking == "uffd-wp"
    finally:
        tt.close()
    assert job.proc.wait(timeout=60) == 0
    assert job.out.read_bytes() == ref
    for name in ("full", "inc1", "inc2"):
        assert restore_fg(tmp_path / name).returncode == 0, name
        assert job.out.read_bytes() == ref, name


def test_dump_left_running_copies_while_frozen_when_the_fork_fails(tmp_path):
    """A process that may not fork (a pids cgroup at its limit): the copy-on-write route
    fails, the dump says so and copies the pages while the process is frozen instead;
    the image holds exactly its memory and the process runs on."""
    pids = Path("/sys/fs/cgroup/pids")
    if not (pids / "cgroup.procs").exists():
        pytest.skip("no cgroup v1 pids controller at /sys/fs/cgroup/pids")
    cg = pids / f"speed-{os.getpid()}-nofork"
    cg.mkdir()
    t = Target()
    try:
        buf = t.alloc(64)
        t.write(buf, 64)
        (cg / "pids.max").write_text("1")
        (cg / "cgroup.procs").write_text(str(t.pid))
        r = dump(t.pid, tmp_path / "img", leave_running=True, cow=True, show_progress=False)
        assert not r.snapshot
        assert any("no copy-on-write snapshot" in n for n in r.notes), r.notes
        iset = ImageSet(tmp_path / "img")
        data = (tmp_path / "img" / iset.pagemap(t.pid).pages_file).read_bytes()
        with open(f"/proc/{t.pid}/mem", "rb", buffering=0) as mem:
            want = os.pread(mem.fileno(), 64 * PAGE, buf)
        got = bytearray(64 * PAGE)
        for run in iset.pagemap(t.pid).runs:
            lo, hi = max(run.vaddr, buf), min(run.vaddr + run.nr_pages * PAGE, buf + 64 * PAGE)
            if lo < hi:
                got[lo - buf:hi - buf] = data[run.offset + lo - run.vaddr:run.offset + hi - run.vaddr]
        assert bytes(got) == want
        assert proc_state(t.pid) != "t"
        t.write(buf, 1)                                   # it runs on, answering
    finally:
        t.close()
        for _ in range(200):
            try:
                cg.rmdir()
                break
            except OSError:
                time.sleep(0.01)

"""Huge address-space reservations, as servers make them (mariadbd maps 8 TiB PROT_NONE
for its buffer pool's largest size): the dump saves the few pages used in them, in memory
bounded by those pages, and the restored program goes on to the uninterrupted output."""
import os
import resource
import signal
import subprocess
import sys
import threading
import time

from tests.engine.helpers import PROGRAMS, Job, cli, reference

PROG = PROGRAMS / "reserved.py"
STEPS = 40
AS_LIMIT = 4 << 30     # a dump reading pagemap for all 3 TiB would need ~6 GiB: MemoryError, not OOM


def _limited() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (AS_LIMIT, AS_LIMIT))


def test_sparse_terabyte_reservations(tmp_path):
    want = reference([sys.executable, PROG, STEPS], tmp_path / "ref.txt")
    job = Job.start([sys.executable, PROG, STEPS], tmp_path / "out.txt")
    try:
        job.wait_lines(5)
        res = cli("dump", "--pid", job.pid, "--images", tmp_path / "img", preexec_fn=_limited)
        assert job.proc.wait(timeout=10) != 0
        assert "MemoryError" not in res.stderr, res.stderr
        pages = sum(f.stat().st_size for f in (tmp_path / "img").glob("pages-*.img"))
        assert pages < 256 << 20, f"{pages} bytes of pages for a few touched pages"
        with open(tmp_path / "out.txt", "ab") as out:
            r = subprocess.run([sys.executable, "-m", "hpcckpt.cli", "restore", "--images", tmp_path / "img"],
                               stdout=out, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, timeout=120)
        assert r.returncode == 0, r.stderr.decode()
    finally:
        job.kill()
    assert (tmp_path / "out.txt").read_bytes() == want


def _meminfo(key: str) -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) << 10 for line in f if line.startswith(key + ":"))


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) << 10 for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return 0


def test_run_takes_full_checkpoints_of_a_job_with_a_reservation(tmp_path):
    """`hpcckpt run --every` of such a job: dirty-page tracking would arm every page of
    the terabytes (kernel page tables, arrays per page: the machine ran out of memory), so
    the run says it takes full checkpoints, each as small as the used pages; killed and
    rerun, the job resumes from the last one to the uninterrupted output. A watchdog kills
    the run if memory grows all the same."""
    steps = 60
    want = reference([sys.executable, PROG, steps], tmp_path / "ref.txt")
    out, err = tmp_path / "out.txt", tmp_path / "run.txt"
    cmd = [sys.executable, "-m", "hpcckpt.cli", "run", "--images", str(tmp_path / "img"), "--every", "0.3", "--",
           sys.executable, str(PROG), str(steps)]
    base_pt = _meminfo("PageTables")
    blown = []

    def start() -> subprocess.Popen:
        with open(out, "ab") as o, open(err, "ab") as e:
            return subprocess.Popen(cmd, stdout=o, stderr=e, stdin=subprocess.DEVNULL, start_new_session=True)

    def watch(p: subprocess.Popen) -> None:
        while p.poll() is None:
            if _rss(p.pid) > 2 << 30 or _meminfo("PageTables") - base_pt > 2 << 30:
                blown.append(True)
                os.killpg(p.pid, signal.SIGKILL)
            time.sleep(0.02)
    mon = start()
    threading.Thread(target=watch, args=(mon,), daemon=True).start()
    try:
        deadline = time.monotonic() + 60
        while err.read_text().count("run: checkpoint ") < 2:
            assert mon.poll() is None and time.monotonic() < deadline, err.read_text()
            time.sleep(0.05)
        os.killpg(mon.pid, signal.SIGKILL)      # the node dies: rerun from the last checkpoint
        mon.wait()
        time.sleep(0.5)
        mon = start()
        threading.Thread(target=watch, args=(mon,), daemon=True).start()
        assert mon.wait(timeout=120) == 0, err.read_text()
    finally:
        if mon.poll() is None:
            os.killpg(mon.pid, signal.SIGKILL)
            mon.wait()
    said = err.read_text()
    assert not blown, "memory grew past the watchdog's limit: " + said
    assert "full checkpoints only" in said and "resumed from" in said, said
    assert out.read_bytes() == want


def test_only_reservations_larger_than_memory_switch_tracking_off(tmp_path):
    """A job's large array (here 3 GiB mapped, a little written) is tracked as usual: only
    a private mapping larger than the node's memory counts as a reservation."""
    from hpcckpt.engine import memory
    from hpcckpt.kernel import proc
    code = ("import mmap,sys; a=mmap.mmap(-1, 3<<30); a[:4096]=b'x'*4096; "
            "b=mmap.mmap(-1, 2<<40, flags=mmap.MAP_PRIVATE|mmap.MAP_ANONYMOUS|0x4000); "  # 0x4000: MAP_NORESERVE
            "print('ready', flush=True); sys.stdin.read()")
    p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert p.stdout.readline() == b"ready\n"
        sizes = [v.end - v.start for v in proc.maps(p.pid, with_flags=False)]
        assert 3 << 30 in sizes and 2 << 40 in sizes
        huge = memory.huge_private(proc.maps(p.pid, with_flags=False))
        assert huge == [h for h in huge if h.endswith("(2048 GiB)")] and len(huge) == 1, huge
    finally:
        p.kill()
        p.wait()

"""Kernel objects beyond memory and plain files: POSIX timers (and setitimer), file
locks (flock, POSIX, OFD; leases refused), eventfd / timerfd / signalfd / epoll shared with a
child. Each program is dumped midway, killed, restored; its output must be identical
to an uninterrupted run's, including its own checks that the objects still work."""
import subprocess
import sys

import pytest

from .helpers import PROGRAMS, Job, cli, pid_alive, reference
from .test_dump_restore import checkpoint_and_resume
from .test_trees import interrupt_and_resume


@pytest.fixture(scope="session")
def kobjects(tmp_path_factory):
    out = tmp_path_factory.mktemp("bin") / "kobjects"
    subprocess.run(["gcc", "-O2", "-o", str(out), str(PROGRAMS / "kobjects.c")], check=True)
    return out


def test_posix_timers_and_itimer(tmp_path, kobjects):
    ref, out = checkpoint_and_resume(tmp_path, [kobjects, "timers", 60, 40], 10)
    assert out == ref
    assert b"signal ticks kept arriving: 1\nthread ticks kept arriving: 1\nitimer ticks kept arriving: 1" in out
    assert b"SIGEV_NONE timer still armed: 1" in out and b"bad siginfo: 0" in out


def test_file_locks(tmp_path, kobjects):
    (tmp_path / "d").mkdir()
    ref, out = checkpoint_and_resume(tmp_path, [kobjects, "locks", 60, 40, tmp_path / "d"], 8)
    assert out == ref
    assert b"flock held: 1\nposix lock held by parent: 1 [10,+20) write\nposix read lock held: 1\n" \
           b"ofd lock held: 1 len 5" in out


def test_lease_is_refused_and_process_runs_on(tmp_path, kobjects):
    (tmp_path / "d").mkdir()
    job = Job.start([kobjects, "lease", 40, 40, tmp_path / "d"], tmp_path / "out.txt")
    try:
        job.wait_lines(3)
        res = cli("dump", "--pid", job.pid, "--images", tmp_path / "img", check=False)
        assert res.returncode != 0
        assert f"process {job.pid}: fd" in res.stderr and "lease.dat" in res.stderr and "LEASE" in res.stderr
        n = job.lines()
        job.wait_lines(n + 2)                 # thawed: still running
        assert pid_alive(job.pid)
    finally:
        job.kill()


def test_eventfd_timerfd_signalfd_epoll_shared_with_child(tmp_path, kobjects):
    """Under `hpcckpt run` (a tree: the child answers on eventfds it shares with its parent)."""
    cmd = [kobjects, "fds", 30, 40]
    ref = reference(cmd, tmp_path / "ref.txt")
    out = tmp_path / "stdout.txt"
    interrupt_and_resume(tmp_path, cmd, lambda: out.exists() and out.read_bytes().count(b"\n") >= 10)
    out = out.read_bytes()
    assert out == ref
    assert b"timerfd kept ticking: 1\nepoll sees the pending signal: 1" in out and b"epoll wrong" not in out


def test_io_uring_refused_naming_process_fd_and_kind(tmp_path):
    """An fd kind the engine does not handle (an io_uring instance) stops the dump."""
    code = ("import ctypes,sys,time\n"
            "fd=ctypes.CDLL(None).syscall(425, 8, ctypes.create_string_buffer(120)); assert fd >= 0\n"
            "print(fd, flush=True)\n"
            "[time.sleep(0.02) for _ in range(100)]; print('done', flush=True)\n")
    job = Job.start([sys.executable, "-c", code], tmp_path / "out.txt")
    try:
        job.wait_lines(1)
        fd = job.out.read_text().split()[0]
        res = cli("dump", "--pid", job.pid, "--images", tmp_path / "img", check=False)
        assert res.returncode != 0
        assert f"process {job.pid}: fd {fd} is a io_uring" in res.stderr
        assert job.proc.wait(timeout=30) == 0          # thawed, ran to its end
        assert job.out.read_text().endswith("done\n")
    finally:
        job.kill()

"""kernel/effects.py: syscalls with effects queued in a restore stub run as one block of code
(one stop), each able to use an earlier one's result, stopping at the first failure, which
is named; injected one by one (W^X) they do exactly the same."""
import os
import signal
import subprocess
import sys

import pytest

from hpcckpt.engine import launch
from hpcckpt.errors import KernelError
from hpcckpt.kernel import proc, ptrace
from hpcckpt.kernel.effects import Queue
from hpcckpt.kernel.inject import Injector, Mem, find_syscall_insn

from .helpers import Job, cli, reference

AT_FDCWD = -100
MAP_SHARED, MAP_PRIVATE, MAP_FIXED, MAP_ANON = 0x1, 0x2, 0x10, 0x20
F_DUPFD_CLOEXEC = 1030
FIXED = 0x7E0000000000        # free in a stub of /bin/true
AREA = 64 << 10
PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1


class Stub:
    """A restore stub (traced, stopped at its exec) with a scratch block, as restore makes."""

    def __init__(self):
        pid = 20000 + os.getpid() % 10000
        while os.path.exists(f"/proc/{pid}"):
            pid += 1
        self.pid = launch.launch_stub(pid)
        self.inj = Injector(self.pid, find_syscall_insn(self.pid, proc.maps(self.pid, with_flags=False)))
        self.regs = self.inj.saved_regs.to_list()
        self.mem = Mem(self.pid)
        self.area = self.inj.syscall("mmap", 0, AREA, 7, MAP_PRIVATE | MAP_ANON, -1, 0)
        self.off = AREA // 2

    def queue(self, code: bool) -> Queue:
        return Queue(self.inj, self.mem, self.area, AREA // 2, code)

    def cstr(self, s) -> int:
        data = os.fsencode(s) + b"\0"
        addr = self.area + self.off
        self.mem.write(addr, data)
        self.off += (len(data) + 15) & ~15
        return addr

    def fds(self) -> dict[int, str]:
        return {int(f): os.readlink(f"/proc/{self.pid}/fd/{f}") for f in os.listdir(f"/proc/{self.pid}/fd")}

    def close(self) -> None:
        self.inj.restore()
        assert ptrace.get_regs(self.pid).to_list() == self.regs
        self.mem.close()
        os.kill(self.pid, signal.SIGKILL)
        while not ptrace.wait(self.pid).exited:
            pass


@pytest.fixture
def stub():
    s = Stub()
    yield s
    s.close()


@pytest.mark.parametrize("code", [True, False], ids=["block", "one-by-one"])
def test_calls_use_earlier_results(stub, tmp_path, code):
    path = tmp_path / "f"
    q = stub.queue(code)
    fd = q.add("openat", AT_FDCWD, stub.cstr(path), os.O_RDWR | os.O_CREAT, 0o600)
    q.add("ftruncate", fd, 8192)
    high = q.add("fcntl", fd, F_DUPFD_CLOEXEC, 100)
    q.add("close", fd)
    q.add("mmap", FIXED, 8192, 3, MAP_SHARED | MAP_FIXED, high, 0, check=FIXED)
    q.add("close", 999, check=None)           # EBADF, not checked: the block goes on
    last = q.add("getpid")
    q.run()
    assert q.stops == (1 if code else 7)      # one stop for the whole block
    assert (fd.value, high.value, last.value) == (3, 100, stub.pid)
    assert stub.fds().get(100) == str(path) and 3 not in stub.fds()
    assert path.stat().st_size == 8192
    vma = next(v for v in proc.maps(stub.pid, with_flags=False) if v.start == FIXED)
    assert (vma.end, vma.path) == (FIXED + 8192, str(path))


@pytest.mark.parametrize("code", [True, False], ids=["block", "one-by-one"])
def test_first_failure_stops_the_rest_and_is_named(stub, tmp_path, code):
    q = stub.queue(code)
    first = q.add("openat", AT_FDCWD, stub.cstr(tmp_path / "a"), os.O_RDWR | os.O_CREAT, 0o600)
    bad = q.add("openat", AT_FDCWD, stub.cstr(tmp_path / "none" / "x"), os.O_RDONLY,
                fail="cannot open the missing one")
    after = q.add("openat", AT_FDCWD, stub.cstr(tmp_path / "b"), os.O_RDWR | os.O_CREAT, 0o600)
    with pytest.raises(KernelError, match=r"^cannot open the missing one: No such file or directory$"):
        q.run()
    assert (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert (first.result, bad.result, after.result) == (3, -2, None)
    q.add("mmap", FIXED, 4096, 3, MAP_PRIVATE | MAP_ANON, -1, 0, check=FIXED + 4096)   # a hint, not FIXED
    q.add("openat", AT_FDCWD, stub.cstr(tmp_path / "c"), os.O_RDWR | os.O_CREAT, 0o600)
    with pytest.raises(KernelError, match=rf"^mmap\({FIXED}, .* failed: got 0x[0-9a-f]+, not {FIXED + 4096:#x}$"):
        q.run()
    assert not (tmp_path / "c").exists()


def test_restore_where_writable_code_is_refused(tmp_path, threads_fp):
    """A restore whose stubs may not map writable executable memory (PR_SET_MDWE, which they
    inherit from the restoring process): its stubs' calls are injected one by one, the stub
    launcher maps its code from a memfd, and the program still finishes exactly."""
    cmd = [threads_fp, 100, 4, 20]
    ref = reference(cmd, tmp_path / "ref.txt")
    job = Job.start(cmd, tmp_path / "out.txt")
    job.wait_lines(10)
    cli("dump", "--pid", job.pid, "--images", tmp_path / "img")
    assert job.proc.wait(timeout=10) == -9
    mdwe = ("import ctypes, os, sys; libc = ctypes.CDLL(None, use_errno=True); "
            f"assert libc.prctl({PR_SET_MDWE}, {PR_MDWE_REFUSE_EXEC_GAIN}, 0, 0, 0) == 0, ctypes.get_errno(); "
            "os.execv(sys.executable, [sys.executable, '-m', 'hpcckpt.cli', *sys.argv[1:]])")
    res = subprocess.run([sys.executable, "-c", mdwe, "restore", "--images", str(tmp_path / "img")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert job.out.read_bytes() == ref

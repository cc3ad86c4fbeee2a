"""kernel/batch.py: many read-only syscalls run in a frozen thread in one stop give the
results injecting them one by one gives, and the thread goes on as it was; a tree's
processes captured together are each left as found when one of them fails."""
import os
import signal
import subprocess
import time

import pytest

from hpcckpt.engine import capture, dump as dump_mod, tree as ptree
from hpcckpt.engine.capture import _Scratch
from hpcckpt.engine.freeze import freeze
from hpcckpt.errors import KernelError
from hpcckpt.kernel import proc, ptrace
from hpcckpt.kernel.batch import OUT
from hpcckpt.kernel.inject import Injector, Mem, find_syscall_insn
from tests.tracking.helpers import Target


def _run(pid: int, code: bool):
    fr = freeze(pid)
    inj = Injector(pid, find_syscall_insn(pid, proc.maps(pid, with_flags=False)))
    mem = Mem(pid)
    before = ptrace.get_regs(pid).to_list()
    try:
        scratch = _Scratch(inj, mem)
        assert scratch.code_ok      # this kernel lets a frozen process map rwx memory
        scratch.code_ok = code
        b = scratch.batch()
        calls = [b.add("getpid"), b.add("rt_sigaction", signal.SIGCHLD, 0, OUT, 8, out=32),
                 b.add("rt_sigaction", signal.SIGUSR1, 0, OUT, 8, out=32),
                 b.add("getitimer", 0, OUT, out=32), b.add("sigaltstack", 0, OUT, out=24),
                 b.add("brk", 0)]
        scratch.run(b, inj)
        assert b.as_code == code            # one stop for all, or the fallback one by one
        bad = scratch.batch()
        bad.add("rt_sigaction", 9999, 0, OUT, 8, out=32)     # no such signal: EINVAL, named
        with pytest.raises(KernelError, match="rt_sigaction.*Invalid argument"):
            scratch.run(bad, inj)
        scratch.unmap()
        return [(c.result, c.data) for c in calls]
    finally:
        inj.restore()
        assert ptrace.get_regs(pid).to_list() == before
        mem.close()
        fr.thaw()


def test_batch_gives_what_one_by_one_gives_and_the_process_runs_on():
    t = Target()
    try:
        maps_before = proc.maps(t.pid, with_flags=False)
        batched, stepped = _run(t.pid, code=True), _run(t.pid, code=False)
        assert batched == stepped
        assert batched[0][0] == t.pid                     # getpid, in its own thread
        assert batched[5][0] > 0                          # brk: an address
        assert proc.maps(t.pid, with_flags=False) == maps_before    # scratch gone
        buf = t.alloc(4)
        t.write(buf, 4)                                   # and it still answers
    finally:
        t.close()


def _cat_tree():
    """sh with three cats reading the pipe we write to: every process blocked in a read
    or wait4 (restarted the same way after each freeze: their registers read alike)."""
    p = subprocess.Popen(["sh", "-c", "exec 3<&0; cat <&3 & cat <&3 & cat <&3 & wait"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True)
    for _ in range(200):
        pids = ptree.members(p.pid, ptree.scan(), None)[0]
        if len(pids) == 4 and all(proc.stat_fields(h)[0] == "S" for h in pids):
            return p, pids
        time.sleep(0.02)
    raise AssertionError("the cats did not start")


def _state(pid: int):
    fr = freeze(pid)
    try:
        return ptrace.get_regs(pid).to_list(), ptrace.get_sigmask(pid)
    finally:
        fr.thaw()


@pytest.mark.parametrize("where", ["reading /proc", "batch under way", "end of the batch", "after the capture"])
def test_tree_capture_failing_midway_leaves_every_process_as_found(tmp_path, monkeypatch, where):
    """The tree's processes are captured step by step together (capture.capture_tree): when
    one fails, the others are at other steps (their scratch mmap, batch or munmap under
    way); each must be left as found: untraced, same registers and mask, no scratch left
    mapped, and working on. A dump that kills the tree leaves each process its scratch
    after the capture: a failure after it (here in the SysV IPC step) takes them away."""
    p, pids = _cat_tree()
    try:
        victim = pids[2]
        before = {h: (proc.maps(h, with_flags=False), _state(h)) for h in pids}
        if where == "reading /proc":        # in the constructor, its mmap under way
            listed = capture.timers.listed
            monkeypatch.setattr(capture.timers, "listed", lambda pid, tids: (
                _fail() if pid == victim else listed(pid, tids)))
        elif where == "after the capture":
            monkeypatch.setattr(dump_mod.sysvipc, "dump", lambda *a: _fail())
        else:
            name = "start_batch" if where == "batch under way" else "end_batch"
            orig = getattr(capture._Capture, name)

            def failing(self):
                orig(self)
                if self.pid == victim:
                    _fail()
            monkeypatch.setattr(capture._Capture, name, failing)
        with pytest.raises(KernelError, match="injected failure"):
            dump_mod.dump(p.pid, tmp_path / "img", show_progress=False, freeze_cgroup=None)
        monkeypatch.undo()
        for h in pids:
            assert proc.status(h)["TracerPid"] == "0"
            assert (proc.maps(h, with_flags=False), _state(h)) == before[h], h
        for k in range(6):              # each cat reads some lines: all of them work on
            p.stdin.write(b"still here %d\n" % k)
            p.stdin.flush()
            assert p.stdout.readline() == b"still here %d\n" % k
        time.sleep(0.2)
        assert [proc.stat_fields(h)[0] for h in pids] == ["S"] * 4      # none crashed
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()


def _fail():
    raise KernelError("injected failure")


def test_injected_syscall_at_an_address_that_faults_is_an_error_not_a_hang():
    """An injection pointed at code that is not there (unmapped) faults at the same
    address on every step: named as an error; the process gets no signal and runs on."""
    t = Target()
    try:
        fr = freeze(t.pid)
        inj = Injector(t.pid, 0x10000)           # below mmap_min_addr: never mapped
        before = ptrace.get_regs(t.pid).to_list()
        try:
            with pytest.raises(KernelError, match="injected syscall at 0x10000 faults .SIGSEGV"):
                inj.syscall("getpid")
        finally:
            inj.restore()
            assert ptrace.get_regs(t.pid).to_list() == before
            fr.thaw()
        buf = t.alloc(4)
        t.write(buf, 4)                          # it still answers
    finally:
        t.close()

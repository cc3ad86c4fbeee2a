"""kernel/batch.py: many read-only syscalls run in a frozen thread in one stop give the
results injecting them one by one gives, and the thread goes on as it was."""
import signal

import pytest

from hpcckpt.engine.dump import _Scratch
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

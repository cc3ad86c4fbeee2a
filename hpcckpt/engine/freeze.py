"""Freezing a process: every thread ptrace-seized and interrupted, none left behind.

Threads are listed again after each round of stops, because a thread not yet stopped
may create more; the loop ends when a listing finds only stopped threads.
"""
import os
import signal
import time
from dataclasses import dataclass, field

from ..errors import HpcckptError, ProcessGoneError
from ..kernel import proc, ptrace
from ..kernel.inject import Injector, find_syscall_insn
from ..kernel.arch import current as arch


@dataclass
class Frozen:
    pid: int
    tids: list[int] = field(default_factory=list)
    # signals that hit a thread while we stopped it; delivered when it runs again
    deferred: dict[int, list[int]] = field(default_factory=dict)
    # (address, length) of memory a dump mapped into the process and left there, the
    # process being killed next (engine/dump.py's scratch): a thaw takes it away first
    scratch: tuple[int, int] | None = None

    def thaw(self) -> None:
        """Let every thread run on exactly as before; errors are reported, not raised."""
        if self.scratch is not None:
            self._unmap_scratch()
        for tid in self.tids:
            sigs = self.deferred.get(tid, [])
            try:
                _reissue_sysv_wait(tid)
                ptrace.detach(tid, sigs[0] if sigs else 0)
                for s in sigs[1:]:
                    os.kill(tid, s)
            except HpcckptError:
                pass

    def _unmap_scratch(self) -> None:
        addr, length = self.scratch
        self.scratch = None
        try:
            inj = Injector(self.pid, find_syscall_insn(self.pid, proc.maps(self.pid, with_flags=False)))
            try:
                inj.syscall("munmap", addr, length)
            finally:
                inj.restore()
                self.deferred.setdefault(self.pid, []).extend(inj.pending_signals)
        except HpcckptError:
            pass        # gone, or going: nothing of it runs on

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        self.reap()

    def reap(self) -> None:
        """After a SIGKILL: take the exit notifications owed to us as tracer."""
        # Collect the exit notifications we are owed as tracer; the leader's comes only
        # after every other thread's has been collected.
        for tid in sorted(self.tids, key=lambda t: t == self.pid):
            try:
                ptrace.wait(tid)
            except HpcckptError:
                pass


def _reissue_sysv_wait(tid: int) -> None:
    """Stopping a thread in semop/msgrcv/msgsnd made the call fail with EINTR (the kernel
    never restarts those); going on, it makes the call again instead of seeing that."""
    try:
        regs = ptrace.get_regs(tid)
        again = arch.reissue_sysv_wait(regs)
        if again is not regs:
            ptrace.set_regs(tid, again)
    except HpcckptError:
        pass        # gone: the detach that follows says so


SLOW_STOP = 0.5   # seconds: a stop this late waits on something else (a vfork child)


def _wait_stop(tid: int, on_slow) -> "ptrace.Stop":
    """The thread's next stop. With `on_slow`: polled, and if none came within SLOW_STOP,
    `on_slow()` is called once before waiting on (a parent in vfork stops only once its
    child has exec'd; in a frozen cgroup that child cannot, until the cgroup thaws)."""
    if on_slow is None:
        return ptrace.wait_trap(tid)
    deadline = time.monotonic() + SLOW_STOP
    delay = 0.00005
    while time.monotonic() < deadline:
        st = ptrace.wait(tid, nohang=True)
        if st is not None:
            if st.exited:
                raise ProcessGoneError(f"thread {tid} exited while being stopped", tid)
            return st
        time.sleep(delay)
        delay = min(delay * 2, 0.01)
    on_slow()
    return ptrace.wait_trap(tid)


def _stop(fr: Frozen, tid: int, on_slow=None) -> bool:
    """Seize and interrupt one thread; False if it exited meanwhile."""
    try:
        ptrace.seize(tid)
        ptrace.interrupt(tid)
        while True:
            st = _wait_stop(tid, on_slow)
            on_slow = None
            if st.event == ptrace.EVENT_STOP:
                return True
            # a signal-delivery stop: let the thread take it, the interrupt stays pending
            ptrace.cont(tid, st.sig)
    except ProcessGoneError:
        if tid == fr.pid:
            raise
        return False


def freeze(pid: int, on_slow=None) -> Frozen:
    """Stop all threads of `pid`. On any failure the ones already stopped run on.
    `on_slow`: see _wait_stop (the cgroup freezer path thaws the cgroup then)."""
    fr = Frozen(pid)
    try:
        stopped: set[int] = set()
        while True:
            new = [t for t in proc.threads(pid) if t not in stopped]
            if not new:
                break
            for tid in new:
                stopped.add(tid)
                if _stop(fr, tid, on_slow):
                    fr.tids.append(tid)
        fr.tids.sort(key=lambda t: (t != pid, t))
        return fr
    except BaseException:
        fr.thaw()
        raise

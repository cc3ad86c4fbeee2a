"""Freezing a process: every thread ptrace-seized and interrupted, none left behind.

Threads are listed again after each round of stops, because a thread not yet stopped
may create more; the loop ends when a listing finds only stopped threads.
"""
import os
import signal
from dataclasses import dataclass, field

from ..errors import HpcckptError, ProcessGoneError
from ..kernel import proc, ptrace
from ..kernel.arch import current as arch


@dataclass
class Frozen:
    pid: int
    tids: list[int] = field(default_factory=list)
    # signals that hit a thread while we stopped it; delivered when it runs again
    deferred: dict[int, list[int]] = field(default_factory=dict)

    def thaw(self) -> None:
        """Let every thread run on exactly as before; errors are reported, not raised."""
        for tid in self.tids:
            sigs = self.deferred.get(tid, [])
            try:
                _reissue_sysv_wait(tid)
                ptrace.detach(tid, sigs[0] if sigs else 0)
                for s in sigs[1:]:
                    os.kill(tid, s)
            except HpcckptError:
                pass

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


def _stop(fr: Frozen, tid: int) -> bool:
    """Seize and interrupt one thread; False if it exited meanwhile."""
    try:
        ptrace.seize(tid)
        ptrace.interrupt(tid)
        while True:
            st = ptrace.wait_trap(tid)
            if st.event == ptrace.EVENT_STOP:
                return True
            # a signal-delivery stop: let the thread take it, the interrupt stays pending
            ptrace.cont(tid, st.sig)
    except ProcessGoneError:
        if tid == fr.pid:
            raise
        return False


def freeze(pid: int) -> Frozen:
    """Stop all threads of `pid`. On any failure the ones already stopped run on."""
    fr = Frozen(pid)
    try:
        stopped: set[int] = set()
        while True:
            new = [t for t in proc.threads(pid) if t not in stopped]
            if not new:
                break
            for tid in new:
                stopped.add(tid)
                if _stop(fr, tid):
                    fr.tids.append(tid)
        fr.tids.sort(key=lambda t: (t != pid, t))
        return fr
    except BaseException:
        fr.thaw()
        raise

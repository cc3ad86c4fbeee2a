"""Live snapshots: a copy-on-write copy of a frozen process's memory, read while it runs.

The frozen target is made to fork (an injected clone() without CLONE_VM, exit_signal 0 so
its parent gets no SIGCHLD); the kernel gives the child the target's address space as it
is at this instant, copy-on-write, and we hold the child stopped (PTRACE_O_TRACECLONE)
before it runs a single instruction. The target is thawed and runs on; its writes copy
pages away from the child, whose memory we then read at leisure. The child is killed
afterwards and its zombie reaped by an injected wait4(__WALL) in the target (one more
stop of well under a millisecond), so the target never sees it.

Mappings a fork does not copy (MADV_DONTFORK) or copies as zeros (MADV_WIPEONFORK) are
read from the target while it is still frozen. Shared memory is not snapshotted (it is
shared with the child too) and is read while frozen by the dump as before.
"""
import os
import signal
from dataclasses import dataclass

from ..errors import HpcckptError, KernelError, ProcessGoneError
from ..kernel import proc, ptrace
from ..kernel.inject import Injector, find_syscall_insn
from .freeze import Frozen, freeze

WALL = 0x40000000
NOT_COPIED = ("dc", "wf")     # smaps VmFlags: dontfork ("do not copy"), wipe-on-fork


@dataclass
class Snapshot:
    target: int          # host PID of the process
    child: int           # host PID of its copy-on-write copy (stopped, traced by us)
    child_ns: int        # the child's PID as the target sees it (for wait4)


def take(fr: Frozen) -> Snapshot:
    """Fork the frozen process; returns its stopped copy."""
    pid = fr.pid
    ptrace.set_options(pid, ptrace.O_TRACECLONE | ptrace.O_TRACEFORK)
    inj = Injector(pid, find_syscall_insn(pid, proc.maps(pid, with_flags=False)))
    try:
        inj.new_child = None
        res = inj.syscall("clone", 0, 0, 0, 0, 0, check=False)
        if res < 0 or inj.new_child is None:
            raise KernelError(f"process {pid}: cannot fork a snapshot copy: "
                              + (os.strerror(-res) if res < 0 else "no clone event"))
        child = inj.new_child
        ptrace.wait_trap(child)
    finally:
        inj.restore()
        fr.deferred.setdefault(pid, []).extend(inj.pending_signals)
        ptrace.set_options(pid, 0)
    return Snapshot(pid, child, res)


def release(s: Snapshot) -> None:
    """Kill the copy, and make the target reap its zombie (it must never see it)."""
    try:
        os.kill(s.child, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        while True:
            st = ptrace.wait(s.child)
            if st is None or st.exited:
                break
    except HpcckptError:
        pass
    try:
        fr = freeze(s.target)
    except ProcessGoneError:
        return
    try:
        inj = Injector(s.target, find_syscall_insn(s.target, proc.maps(s.target, with_flags=False)))
        try:
            inj.syscall("wait4", s.child_ns, 0, WALL, 0, check=False)
        finally:
            inj.restore()
            fr.deferred.setdefault(s.target, []).extend(inj.pending_signals)
    finally:
        fr.thaw()

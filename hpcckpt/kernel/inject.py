"""Syscall injection: make a ptrace-stopped thread execute one syscall for us.

The thread's registers are pointed at an existing `syscall` instruction (found in the
vDSO or any executable mapping, so nothing in the target is overwritten), single-stepped
over it, and the result read from the return register. Every signal is blocked while we
do this so none is delivered mid-injection; `restore()` puts registers and mask back.
"""
import os
import signal

from ..errors import KernelError, ProcessGoneError
from . import ptrace
from .arch import current as arch
from .libc import read_mem

ALL_SIGNALS = (1 << 64) - 1
FAULTS = (signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE)
CODE = "code"       # Injector.running: machine code let run (run_code)


def find_syscall_insn(pid: int, vmas) -> int:
    """An address holding the syscall instruction, preferring the vDSO."""
    ordered = sorted(vmas, key=lambda v: (v.path != "[vdso]", v.size))
    unreadable = 0
    for v in ordered:
        if "x" not in v.prot or "r" not in v.prot and v.path != "[vdso]":
            continue
        length = min(v.size, 1 << 20)
        try:
            data = read_mem(pid, v.start, length)
        except FileNotFoundError:
            raise ProcessGoneError(f"process {pid} exited (or was killed) during the dump") from None
        except OSError:
            if not _alive(pid):
                raise ProcessGoneError(f"process {pid} exited (or was killed) during the dump") from None
            unreadable += 1
            continue
        if not data:     # an exiting process's memory reads as nothing
            unreadable += 1
            continue
        i = data.find(arch.SYSCALL_INSN)
        if i >= 0:
            return v.start + i
    if unreadable:   # the vDSO at least is always readable, unless the process is dying
        raise ProcessGoneError(f"process {pid}: its memory cannot be read any more (it is exiting, "
                               "or was killed)")
    raise KernelError(f"process {pid}: no syscall instruction found in any executable mapping")


def _alive(pid: int) -> bool:
    """Not gone and not a zombie (a killed process's memory reads fail: ESRCH, EIO)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return text[text.rindex(")") + 2] not in "ZX"


class Mem:
    """Read and write a process's memory through /proc/PID/mem (ignores protections)."""

    def __init__(self, pid: int):
        self.pid = pid
        try:
            self.fd = os.open(f"/proc/{pid}/mem", os.O_RDWR)
        except FileNotFoundError:
            raise ProcessGoneError(f"process {pid} does not exist (or exited)") from None

    def read(self, addr: int, length: int) -> bytes:
        return os.pread(self.fd, length, addr)

    def write(self, addr: int, data: bytes) -> None:
        done = 0
        while done < len(data):
            done += os.pwrite(self.fd, data[done:], addr + done)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Injector:
    """Runs syscalls in one stopped thread; remembers how to put the thread back."""

    def __init__(self, tid: int, syscall_ip: int):
        self.tid = tid
        self.syscall_ip = syscall_ip
        self.saved_regs = ptrace.get_regs(tid)
        self.saved_mask = ptrace.get_sigmask(tid)
        ptrace.set_sigmask(tid, ALL_SIGNALS)
        self.pending_signals: list[int] = []
        self.new_child: int | None = None  # PID (as we see it) of the last fork/clone it made
        self.running: tuple | str | None = None  # a syscall's (name, args), or CODE: started, not ended

    def syscall(self, name: str, *args: int, check: bool = True) -> int:
        self.start(name, *args)
        return self.finish(check)

    def start(self, name: str, *args: int) -> None:
        """Set the thread off on one syscall and return at once: a tree's processes run
        theirs at the same time, and the dump waits for them together (`finish`), not
        for each in turn (a stop costs scheduling latency, 0.1-1 ms on a busy node)."""
        nr = arch.SYSCALLS[name]
        ptrace.set_regs(self.tid, arch.prepare_syscall(self.saved_regs, nr, args, self.syscall_ip))
        ptrace.singlestep(self.tid)
        self.running = (name, args)

    def finish(self, check: bool = True) -> int:
        """The result of the syscall `start` set off, once the thread has stopped again."""
        name, args = self.running
        self.wait_step()
        res = arch.syscall_return(ptrace.get_regs(self.tid))
        if check and -4096 < res < 0:
            raise KernelError(f"{name}{args} in process {self.tid} failed: {os.strerror(-res)}")
        return res

    def wait_step(self) -> None:
        """Wait for the single step under way to end (events and signals on the way are
        stepped over, signals remembered)."""
        self.running = None
        faults = 0
        while True:
            st = ptrace.wait_trap(self.tid)
            if st.sig == 5 and st.event == 0:  # SIGTRAP from the single step
                break
            if st.event in (ptrace.EVENT_FORK, ptrace.EVENT_VFORK, ptrace.EVENT_CLONE):
                self.new_child = ptrace.event_msg(self.tid)  # in our PID namespace
            if st.event:  # an event stop (fork, interrupt, group stop): step again
                ptrace.singlestep(self.tid)
                continue
            if st.sig in FAULTS and arch.ip(ptrace.get_regs(self.tid)) == self.syscall_ip:
                faults += 1             # the syscall instruction itself faults: stepping it
                if faults == 3:         # again would fault forever
                    raise KernelError(f"process {self.tid}: the injected syscall at {self.syscall_ip:#x} "
                                      f"faults ({signal.Signals(st.sig).name}); its code is gone or unmapped")
                ptrace.singlestep(self.tid)
                continue
            # A signal that the all-blocking mask could not hold off (e.g. a synchronous
            # fault): remember it, suppress it now, deliver it when the thread goes on.
            self.pending_signals.append(st.sig)
            ptrace.singlestep(self.tid)

    def run_code(self, start: int) -> None:
        """Let the thread run machine code at `start` (kernel/batch.py's); `wait_code`
        returns its next stop."""
        ptrace.set_regs(self.tid, arch.prepare_syscall(self.saved_regs, 0, (), start))
        ptrace.cont(self.tid)
        self.running = CODE

    def wait_code(self) -> "ptrace.Stop":
        """The next stop of code `run_code` let run (event stops are gone past)."""
        self.running = None
        while True:
            st = ptrace.wait_trap(self.tid)
            if not st.event:
                return st
            ptrace.cont(self.tid)       # an event stop (interrupt, group stop): go on

    def restore(self, regs=None) -> None:
        """Put back the registers (or the given ones) and the signal mask; a syscall or
        code still under way (a failure elsewhere in the tree) is let stop first."""
        if self.running == CODE:
            self.wait_code()            # a signal stop (a fault) is not delivered: set aside
        elif self.running is not None:
            self.wait_step()
        ptrace.set_regs(self.tid, regs if regs is not None else self.saved_regs)
        ptrace.set_sigmask(self.tid, self.saved_mask)

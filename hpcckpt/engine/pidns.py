"""A PID namespace of our own, so a restored process always gets its PIDs back, and an IPC
namespace of our own, so the job's SysV IPC objects are its own and come back with their
IDs (engine/sysvipc.py).

The monitor unshares CLONE_NEWPID (and CLONE_NEWIPC, which moves the monitor itself) and forks a minimal init (PID 1 in the namespace)
that reaps orphans at once; the job is then created as PID 2, by fork for a fresh run
or by clone3(set_tid) for a restore. The monitor stays the job's parent, so it gets the
job's exit status. If the monitor dies, the init dies (PDEATHSIG) and with it the job.
"""
import ctypes
import os
import signal
import time

from ..errors import KernelError
from ..kernel.libc import libc
from . import userns

CLONE_NEWPID = 0x20000000
CLONE_NEWIPC = 0x08000000
PR_SET_PDEATHSIG = 1
JOB_PID = 2  # the job's PID inside its namespace
WALL = 0x40000000   # __WALL: children of any kind, traced ones too

_init_pid: int | None = None
_ipc_ns: int | None = None   # inode of the IPC namespace ensure() made


def ipc_namespace() -> int | None:
    """The IPC namespace ensure() made (the job's), or None."""
    return _ipc_ns


def _init_loop() -> None:
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGQUIT):
        signal.signal(s, signal.SIG_IGN)

    def reap(_sig, _frame):
        while True:
            try:
                if os.waitpid(-1, os.WNOHANG)[0] == 0:
                    return
            except ChildProcessError:
                return
    signal.signal(signal.SIGCHLD, reap)
    while True:
        signal.pause()


def ensure() -> int:
    """Enter a new PID namespace (once per process) with its init, and a new IPC namespace;
    returns the init's PID."""
    global _init_pid, _ipc_ns
    if _init_pid is not None:
        return _init_pid
    from .sysvipc import read_limits, write_limits
    limits = read_limits()
    userns.enter_if_unprivileged()
    if libc.unshare(CLONE_NEWPID | CLONE_NEWIPC) != 0:
        raise KernelError(f"cannot create a PID and IPC namespace: {os.strerror(ctypes.get_errno())} "
                          "(needs root)")
    _ipc_ns = os.stat("/proc/thread-self/ns/ipc").st_ino
    write_limits(limits)     # a new IPC namespace starts from the kernel's defaults
    pid = os.fork()
    if pid == 0:
        try:
            _init_loop()
        finally:
            os._exit(0)
    _init_pid = pid
    return pid


def shutdown(job: int | None = None) -> None:
    """Kill the namespace's init, and with it anything left in the namespace.

    The init's exit waits until every process of the namespace is reaped (the kernel's
    zap_pid_ns_processes), and the job (PID 2) is our child, not the init's: a job not
    collected yet (a zombie, or killed now) is collected here, else the init and we wait
    for each other forever. `job`: its PID (as we see it); without it, every child of
    ours that ends meanwhile is collected."""
    global _init_pid
    if _init_pid is None:
        return
    init, _init_pid = _init_pid, None
    try:
        os.kill(init, signal.SIGKILL)
    except ProcessLookupError:
        pass
    others = -1 if job is None else job      # what else of ours may hold the init up
    while True:
        try:
            if os.waitpid(init, os.WNOHANG | WALL)[0]:
                return
        except ChildProcessError:
            return          # collected below (others = -1)
        try:
            os.waitpid(others, os.WNOHANG | WALL)
        except ChildProcessError:
            pass
        time.sleep(0.005)

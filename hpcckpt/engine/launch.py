"""Creating the process a restore fills in: a traced stub at the exact PID of the image.

clone3 with set_tid gives the PID back; the child asks to be traced and execs a small
program, so it stops before any of that program's code runs, with a clean address space
we then replace. The stub dies with us (PTRACE_O_EXITKILL) until the restore completes.
"""
import ctypes
import errno
import os
import shutil
import signal
import struct
import time

from ..errors import RestoreError
from ..kernel import proc, ptrace
from ..kernel.arch import current as arch
from ..kernel.libc import libc_gil
from . import userns

STUB = shutil.which("true") or "/bin/true"
CLONE_ARGS = struct.Struct("<11Q")


def _who(pid: int) -> str:
    try:
        return f"{proc.comm(pid)} (uid {proc.status(pid)['Uid'].split()[0]})"
    except Exception:
        return "another process"


#: Seconds a stub may take to reach its exec (it takes about a millisecond).
STUB_START = 5.0
ATTEMPTS = 3


def launch_stub(pid: int) -> int:
    """A stopped, traced child whose PID is `pid` (in our PID namespace).

    The child of a raw clone3 runs a few lines of Python before its exec, with none of the
    interpreter's after-fork repairs: when another of our threads had asked for the GIL at
    the clone, the child waits for that thread, which it does not have, forever. Such a
    child is killed (it is ours and not traced yet) and made again."""
    for _ in range(ATTEMPTS):
        child = _clone_stub(pid)
        st = _started(child)
        if st is not None:
            break
        os.kill(child, signal.SIGKILL)
        ptrace.wait(child)
    else:
        raise RestoreError(f"the restore stub for PID {pid} did not reach its exec in {STUB_START:g} s, "
                           f"{ATTEMPTS} times (a machine this loaded cannot restore now: retry later)")
    if st.exited or st.sig != signal.SIGTRAP:
        raise RestoreError(f"the restore stub {STUB} did not start under trace ({st})")
    ptrace.set_options(child, ptrace.O_EXITKILL | ptrace.O_TRACECLONE)
    return child


def _started(child: int) -> ptrace.Stop | None:
    """The child's first stop (or end), or None if it hung before its exec."""
    deadline = time.monotonic() + STUB_START
    pause = 0.0002
    while (st := ptrace.wait(child, nohang=True)) is None:
        if time.monotonic() > deadline:
            return None
        time.sleep(pause)
        pause = min(pause * 2, 0.01)
    return st


def _clone_stub(pid: int) -> int:
    set_tid = (ctypes.c_int * 1)(pid)
    args = ctypes.create_string_buffer(CLONE_ARGS.pack(
        0, 0, 0, 0, signal.SIGCHLD, 0, 0, 0, ctypes.addressof(set_tid), 1, 0))
    res = libc_gil.syscall(ctypes.c_long(arch.SYSCALLS["clone3"]), args, ctypes.c_long(CLONE_ARGS.size))
    if res == 0:  # the child: trace me, then become the stub. Nothing else may run here.
        try:
            userns.keep_stub_caps()
            libc_gil.ptrace(ctypes.c_long(ptrace.TRACEME), 0, None, None)
            os.execv(STUB, [STUB])
        finally:
            os._exit(127)
    if res < 0:
        e = ctypes.get_errno()
        if e == errno.EEXIST:
            raise RestoreError(
                f"PID {pid} is in use by {_who(pid)}: the image needs its PID back. Restore "
                "after that process is gone, or run jobs under `hpcckpt run`, which gives each "
                "its own PID namespace so its PIDs are always free")
        if e == errno.EPERM:
            raise RestoreError(f"not allowed to create PID {pid}: restoring needs root (CAP_SYS_ADMIN "
                               "or CAP_CHECKPOINT_RESTORE)")
        raise RestoreError(f"clone3 for PID {pid} failed: {os.strerror(e)}")
    return res

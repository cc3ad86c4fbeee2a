"""Creating the process a restore fills in: a traced stub at the exact PID of the image.

clone3 with set_tid gives the PID back; the child asks to be traced and execs a small
program, so it stops before any of that program's code runs, with a clean address space
we then replace. The stub dies with us (PTRACE_O_EXITKILL) until the restore completes.
"""
import errno
import os
import shutil
import signal
import struct

from ..errors import RestoreError
from ..kernel import proc, ptrace, rawspawn
from . import userns

STUB = shutil.which("true") or "/bin/true"
CLONE_ARGS = struct.Struct("<11Q")


def _who(pid: int) -> str:
    try:
        return f"{proc.comm(pid)} (uid {proc.status(pid)['Uid'].split()[0]})"
    except Exception:
        return "another process"


def launch_stub(pid: int) -> int:
    """A stopped, traced child whose PID is `pid` (in our PID namespace)."""
    child = _clone_stub(pid)
    st = ptrace.wait(child)
    if st.exited or st.sig != signal.SIGTRAP:
        raise RestoreError(f"the restore stub {STUB} did not start under trace ({st})")
    ptrace.set_options(child, ptrace.O_EXITKILL | ptrace.O_TRACECLONE)
    return child


def _clone_stub(pid: int) -> int:
    """clone3 at `pid`; the child keeps the capabilities a rootless restore needs, asks to
    be traced and execs the stub program, all in machine code: a child of this
    multi-threaded process that ran any Python could wait forever for the interpreter lock
    (kernel/rawspawn.py)."""
    with rawspawn.Block() as b:
        set_tid = b.put(struct.pack("<i", pid))
        args = b.put(CLONE_ARGS.pack(0, 0, 0, 0, signal.SIGCHLD, 0, 0, 0, set_tid, 1, 0))
        child = userns.stub_cap_calls(b.put) + [("ptrace", (ptrace.TRACEME, 0, 0, 0))]
        res = b.fork_exec(("clone3", (args, CLONE_ARGS.size)), child, STUB, [STUB])
    if res < 0:
        e = -res
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

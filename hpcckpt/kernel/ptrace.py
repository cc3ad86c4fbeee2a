"""ptrace requests on one thread, with errors turned into ours.

python-ptrace gives the raw call; the requests it lacks constants for (SEIZE, INTERRUPT,
GETREGSET with the xsave note, signal masks, rseq config) are named here.
"""
import ctypes
import os
import signal
from dataclasses import dataclass

from ptrace.binding.func import ptrace as _raw_ptrace
from ptrace.error import PtraceError

from ..errors import KernelError, ProcessGoneError
from .arch import current as arch
from .libc import iovec

TRACEME = 0
CONT = 7
KILL = 8
SINGLESTEP = 9
GETREGS = 12
SETREGS = 13
DETACH = 17
SETOPTIONS = 0x4200
GETEVENTMSG = 0x4201
GETSIGINFO = 0x4202
GETREGSET = 0x4204
SETREGSET = 0x4205
SEIZE = 0x4206
INTERRUPT = 0x4207
PEEKSIGINFO = 0x4209
GETSIGMASK = 0x420A
SETSIGMASK = 0x420B
GET_RSEQ_CONFIGURATION = 0x420F

O_TRACEFORK = 0x2
O_TRACECLONE = 0x8
O_EXITKILL = 0x100000
EVENT_FORK = 1
EVENT_VFORK = 2
EVENT_CLONE = 3
EVENT_STOP = 128
PEEKSIGINFO_SHARED = 1

WALL = 0x40000000
SIGINFO_SIZE = 128


def call(request: int, tid: int, addr: int = 0, data: int = 0) -> int:
    try:
        return _raw_ptrace(request, tid, addr, data)
    except PtraceError as e:
        if e.errno == 3:  # ESRCH: gone, or not stopped under us
            raise ProcessGoneError(f"thread {tid} is gone or not stopped (ptrace request {request:#x})") from None
        raise KernelError(f"ptrace request {request:#x} on thread {tid} failed: {os.strerror(e.errno or 0)}") from None


def seize(tid: int, options: int = 0) -> None:
    try:
        _raw_ptrace(SEIZE, tid, 0, options)
    except PtraceError as e:
        if e.errno == 3:
            raise ProcessGoneError(f"process {tid} does not exist (or exited)") from None
        if e.errno == 1:
            raise KernelError(
                f"not allowed to trace process {tid}: another tracer (a debugger, strace, "
                "another hpcckpt) holds it, or it is not yours") from None
        raise KernelError(f"cannot attach to {tid}: {os.strerror(e.errno or 0)}") from None


def interrupt(tid: int) -> None:
    call(INTERRUPT, tid)


def cont(tid: int, sig: int = 0) -> None:
    call(CONT, tid, 0, sig)


def singlestep(tid: int, sig: int = 0) -> None:
    call(SINGLESTEP, tid, 0, sig)


def detach(tid: int, sig: int = 0) -> None:
    call(DETACH, tid, 0, sig)


def set_options(tid: int, options: int) -> None:
    call(SETOPTIONS, tid, 0, options)


def event_msg(tid: int) -> int:
    val = ctypes.c_ulong()
    call(GETEVENTMSG, tid, 0, ctypes.addressof(val))
    return val.value


def get_regs(tid: int) -> "arch.Regs":
    regs = arch.Regs()
    call(GETREGS, tid, 0, ctypes.addressof(regs))
    return regs


def set_regs(tid: int, regs: "arch.Regs") -> None:
    call(SETREGS, tid, 0, ctypes.addressof(regs))


def get_regset(tid: int, note: int, max_size: int) -> bytes:
    buf = ctypes.create_string_buffer(max_size)
    iov = iovec(ctypes.addressof(buf), max_size)
    call(GETREGSET, tid, note, ctypes.addressof(iov))
    return buf.raw[: iov.iov_len]


def set_regset(tid: int, note: int, data: bytes) -> None:
    buf = ctypes.create_string_buffer(data, len(data))
    iov = iovec(ctypes.addressof(buf), len(data))
    call(SETREGSET, tid, note, ctypes.addressof(iov))


def get_sigmask(tid: int) -> int:
    mask = ctypes.c_uint64()
    call(GETSIGMASK, tid, 8, ctypes.addressof(mask))
    return mask.value


def set_sigmask(tid: int, mask: int) -> None:
    m = ctypes.c_uint64(mask)
    call(SETSIGMASK, tid, 8, ctypes.addressof(m))


class _PeekArgs(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("flags", ctypes.c_uint32), ("nr", ctypes.c_int32)]


def peek_siginfo(tid: int, shared: bool) -> list[bytes]:
    """Queued signals (raw 128-byte siginfo each), without dequeuing them."""
    out: list[bytes] = []
    buf = ctypes.create_string_buffer(SIGINFO_SIZE * 32)
    while True:
        args = _PeekArgs(len(out), PEEKSIGINFO_SHARED if shared else 0, 32)
        n = call(PEEKSIGINFO, tid, ctypes.addressof(args), ctypes.addressof(buf))
        if n <= 0:
            return out
        out.extend(buf.raw[i * SIGINFO_SIZE:(i + 1) * SIGINFO_SIZE] for i in range(n))


class RseqConfig(ctypes.Structure):
    _fields_ = [("rseq_abi_pointer", ctypes.c_uint64), ("rseq_abi_size", ctypes.c_uint32),
                ("signature", ctypes.c_uint32), ("flags", ctypes.c_uint32), ("pad", ctypes.c_uint32)]


def get_rseq(tid: int) -> RseqConfig:
    cfg = RseqConfig()
    call(GET_RSEQ_CONFIGURATION, tid, ctypes.sizeof(cfg), ctypes.addressof(cfg))
    return cfg


@dataclass
class Stop:
    """What waitpid said about a traced thread."""
    tid: int
    exited: bool = False
    exit_code: int | None = None
    killed_by: int | None = None
    sig: int = 0        # the stop signal
    event: int = 0      # PTRACE_EVENT_* (status >> 16)


def wait(tid: int, nohang: bool = False) -> Stop | None:
    try:
        pid, status = os.waitpid(tid, WALL | (os.WNOHANG if nohang else 0))
    except ChildProcessError:
        raise ProcessGoneError(f"thread {tid} is gone") from None
    if pid == 0:
        return None
    if os.WIFEXITED(status):
        return Stop(pid, exited=True, exit_code=os.WEXITSTATUS(status))
    if os.WIFSIGNALED(status):
        return Stop(pid, exited=True, killed_by=os.WTERMSIG(status))
    return Stop(pid, sig=os.WSTOPSIG(status), event=(status >> 16) & 0xFF)


def wait_trap(tid: int) -> Stop:
    """Wait until the thread stops for us; a signal arriving meanwhile is re-delivered later.

    Returns the stop; pending signals that interrupted the wait are collected in
    `Stop.sig` only when they are not SIGTRAP (the caller decides what to do with them).
    """
    st = wait(tid)
    if st.exited:
        raise ProcessGoneError(
            f"thread {tid} exited while stopped under hpcckpt"
            + (f" (killed by {signal.Signals(st.killed_by).name})" if st.killed_by else f" (status {st.exit_code})"),
            tid, st.killed_by if st.killed_by else (st.exit_code or 0) << 8)
    return st

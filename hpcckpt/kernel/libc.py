"""ctypes access to the C library for the calls Python's os module lacks."""
import ctypes
import ctypes.util
import errno
import os

from ..errors import KernelError

libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

libc.syscall.restype = ctypes.c_long

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


class iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


def raw_syscall(nr: int, *args: int) -> int:
    """Call a syscall by number; raise OSError with errno on failure."""
    res = libc.syscall(ctypes.c_long(nr), *[ctypes.c_long(a) for a in args])
    if res == -1:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return res


def pidfd_open(pid: int) -> int:
    from .arch import current
    return raw_syscall(current.SYSCALLS["pidfd_open"], pid, 0)


def pidfd_getfd(pidfd: int, targetfd: int) -> int:
    """Duplicate fd `targetfd` of the process behind `pidfd` into ours."""
    from .arch import current
    return raw_syscall(current.SYSCALLS["pidfd_getfd"], pidfd, targetfd, 0)


libc.process_vm_readv.restype = ctypes.c_ssize_t
libc.process_vm_readv.argtypes = [ctypes.c_int, ctypes.POINTER(iovec), ctypes.c_ulong,
                                  ctypes.POINTER(iovec), ctypes.c_ulong, ctypes.c_ulong]
libc.process_vm_writev.restype = ctypes.c_ssize_t
libc.process_vm_writev.argtypes = libc.process_vm_readv.argtypes


def _vm_io(fn, pid: int, local: int, remote: int, length: int) -> int:
    liov = iovec(local, length)
    riov = iovec(remote, length)
    n = fn(pid, ctypes.byref(liov), 1, ctypes.byref(riov), 1, 0)
    if n < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{os.strerror(e)} (pid {pid}, address {remote:#x}, {length} bytes)")
    return n


def vm_read(pid: int, local_addr: int, remote_addr: int, length: int) -> int:
    """Copy target memory into our buffer at local_addr; returns bytes copied."""
    return _vm_io(libc.process_vm_readv, pid, local_addr, remote_addr, length)


def vm_write(pid: int, local_addr: int, remote_addr: int, length: int) -> int:
    """Copy our buffer at local_addr into the target's memory (must be writable there)."""
    return _vm_io(libc.process_vm_writev, pid, local_addr, remote_addr, length)


def read_mem(pid: int, addr: int, length: int) -> bytes:
    """Read target memory through /proc/PID/mem, which ignores protections (FOLL_FORCE)."""
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as f:
        return os.pread(f.fileno(), length, addr)


def write_mem(pid: int, addr: int, data: bytes) -> None:
    """Write target memory through /proc/PID/mem (works on read-only private pages)."""
    fd = os.open(f"/proc/{pid}/mem", os.O_WRONLY)
    try:
        done = 0
        while done < len(data):
            done += os.pwrite(fd, data[done:], addr + done)
    finally:
        os.close(fd)


def check(res: int, what: str) -> int:
    if res < 0:
        raise KernelError(f"{what}: {os.strerror(-res)} (errno {errno.errorcode.get(-res, -res)})")
    return res

"""userfaultfd plumbing for tracking another process's writes.

A userfaultfd acts on the memory of the process that created it, so the target makes it
(one injected syscall), we take a copy with pidfd_getfd and the target closes its own.
Everything after that is ioctls on our copy: the kernel applies them to the target's
address space. Numbers are from Linux's uapi/linux/userfaultfd.h (Debian 12's headers
lack WP_ASYNC).
"""
import errno
import fcntl
import os
import struct

from ..errors import KernelError
from ..kernel.inject import Injector
from ..kernel.libc import pidfd_getfd, pidfd_open

UFFD_API = 0xAA
UFFDIO_API = 0xC018AA3F
UFFDIO_REGISTER = 0xC020AA00
UFFDIO_UNREGISTER = 0x8010AA01
UFFDIO_REGISTER_MODE_WP = 2
UFFD_FEATURE_WP_UNPOPULATED = 1 << 13
UFFD_FEATURE_WP_ASYNC = 1 << 15
UFFD_USER_MODE_ONLY = 1
O_CLOEXEC = 0o2000000
O_NONBLOCK = 0o4000


def open_in_target(inj: Injector, pid: int, user_mode_only: bool = True) -> int:
    """A userfaultfd for `pid`'s memory, held by us; the target keeps no fd.
    `user_mode_only`: a user's process may be given one that handles only its own
    faults (vm.unprivileged_userfaultfd=0): enough for async write-protect, which the
    kernel resolves itself, never for synchronous faults, where the kernel's own writes
    to the job's memory (rseq, a read() into its buffer) would fail instead of waiting."""
    flags = O_CLOEXEC | O_NONBLOCK
    tfd = inj.syscall("userfaultfd", flags, check=False)
    if tfd == -errno.EPERM and not user_mode_only:
        raise KernelError(f"process {pid} may only have a user-mode-only userfaultfd "
                          "(vm.unprivileged_userfaultfd=0 and it runs without CAP_SYS_PTRACE)")
    if tfd == -errno.EPERM:
        tfd = inj.syscall("userfaultfd", flags | UFFD_USER_MODE_ONLY, check=False)
    if tfd < 0:
        raise KernelError(f"userfaultfd() in process {pid} failed: {os.strerror(-tfd)}")
    try:
        pidfd = pidfd_open(pid)
        try:
            return pidfd_getfd(pidfd, tfd)
        except OSError as e:
            raise KernelError(f"pidfd_getfd of process {pid}'s userfaultfd: {e.strerror}") from None
        finally:
            os.close(pidfd)
    finally:
        inj.syscall("close", tfd, check=False)


def enable_wp_async(fd: int) -> None:
    """UFFDIO_API with asynchronous write-protect: writes are resolved by the kernel, only
    recorded (the page loses its wp bit), never delivered to us as events."""
    want = UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED
    buf = bytearray(struct.pack("<3Q", UFFD_API, want, 0))
    try:
        fcntl.ioctl(fd, UFFDIO_API, buf)
    except OSError as e:
        raise KernelError(f"UFFDIO_API with WP_ASYNC: {os.strerror(e.errno)} "
                          "(kernel older than 6.7?)") from None
    _, features, _ = struct.unpack("<3Q", buf)
    if features & want != want:
        raise KernelError(f"userfaultfd lacks WP_ASYNC/WP_UNPOPULATED (features {features:#x})")


def register_wp(fd: int, start: int, length: int) -> None:
    """Register [start, start+length) for write-protect tracking; OSError if refused."""
    buf = bytearray(struct.pack("<4Q", start, length, UFFDIO_REGISTER_MODE_WP, 0))
    fcntl.ioctl(fd, UFFDIO_REGISTER, buf)

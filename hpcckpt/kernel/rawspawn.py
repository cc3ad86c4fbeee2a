"""Fork and exec with no Python in the child: a few bytes of machine code do it.

A child forked from a multi-threaded Python process has only the forking thread; running
any Python there (even the few lines between a raw clone and an exec) can wait forever for
the interpreter lock, which another thread, absent from the child, had been asked to hand
over (a forced GIL switch waits for that thread to take it). The interpreter's own fork
repairs this, but a raw clone3 (to choose the child's PID) gets no repair. So the clone,
the child's set-up syscalls and its execve are machine code in a block of our memory,
called through ctypes: the child executes nothing but that code (`arch.fork_exec_code`),
and every byte it reads (clone arguments, paths, argv, capability data) is in the block
before the call.
"""
from __future__ import annotations

import ctypes
import os

from ..errors import KernelError
from .arch import current as arch
from .libc import PAGE_SIZE, libc

PROT_READ, PROT_EXEC, MAP_SHARED = 1, 4, 0x01
CODE_ROOM = 2048            # the machine code goes first; the data after it

libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
# the call keeps the GIL (as a C extension's fork would): the clone is short, and giving
# the lock up and back costs a switch interval (5 ms) when other threads want it
_FUNC = ctypes.PYFUNCTYPE(ctypes.c_long)


class Block:
    """A memfd mapped read-only and executable, written through the file: the data the
    child reads (`put`), then the code (`fork_exec`). Never writable and executable at
    once, and no anonymous memory made executable: W^X policies (PR_SET_MDWE, systemd's
    MemoryDenyWriteExecute, SELinux execmem) allow it."""

    def __init__(self, size: int = 2 * PAGE_SIZE):
        self.size = size
        self.fd = os.memfd_create("hpcckpt-launch", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, size)
            addr = libc.mmap(None, size, PROT_READ | PROT_EXEC, MAP_SHARED, self.fd, 0)
            if addr in (None, ctypes.c_void_p(-1).value):
                raise KernelError("cannot map a process launcher's code "
                                  f"({os.strerror(ctypes.get_errno())}): a policy forbids executing "
                                  "a memfd's pages")
        except BaseException:
            os.close(self.fd)
            raise
        self.base = addr
        self.used = CODE_ROOM

    def __enter__(self) -> "Block":
        return self

    def __exit__(self, *exc) -> None:
        libc.munmap(self.base, self.size)
        os.close(self.fd)

    def put(self, data: bytes) -> int:
        """Copy `data` into the block; its address there (valid until the block is closed)."""
        if self.used + len(data) > self.size:
            raise KernelError(f"a process launcher needs more than {self.size} bytes of data")
        os.pwrite(self.fd, data, self.used)
        addr = self.base + self.used
        self.used += (len(data) + 15) & ~15
        return addr

    def cstr(self, s: str | bytes) -> int:
        return self.put(os.fsencode(s) + b"\0")

    def fork_exec(self, fork: tuple[str, tuple[int, ...]], child: list[tuple[str, tuple[int, ...]]],
                  exe: str, argv: list[str]) -> int:
        """Make the `fork` syscall (a clone without CLONE_VM); the child makes the `child`
        syscalls (results ignored, as a pre-exec hook's would be), then execs `exe` with
        `argv` and our environment, or exits with status 127. Returns the syscall's result
        in the parent: the child's PID, or -errno."""
        args = [self.cstr(a) for a in argv]
        argv_addr = self.put(b"".join(a.to_bytes(8, "little") for a in [*args, 0]))
        envp = ctypes.c_void_p.in_dll(libc, "environ").value or 0
        calls = [*child, ("execve", (self.cstr(exe), argv_addr, envp))]
        code = arch.fork_exec_code((arch.SYSCALLS[fork[0]], fork[1]),
                                   [(arch.SYSCALLS[n], a) for n, a in calls])
        if len(code) > CODE_ROOM:
            raise KernelError(f"a process launcher's code needs more than its {CODE_ROOM} bytes")
        os.pwrite(self.fd, code, 0)
        return _FUNC(self.base)()

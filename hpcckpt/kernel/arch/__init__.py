"""Per-architecture register layouts and syscall ABI, behind one narrow interface.

An architecture module provides: `Regs` (the ptrace user_regs_struct as a ctypes
Structure), `SYSCALLS` (name -> number), `SYSCALL_INSN` (the bytes of the syscall
instruction), `XSTATE_NOTE` (regset holding the full FPU/vector state), and functions
`prepare_syscall(regs, nr, args, ip)`, `syscall_return(regs)`, `ip(regs)`, `sp(regs)`.
"""
import platform

from ...errors import UnsupportedError

_machine = platform.machine()
if _machine == "x86_64":
    from . import x86_64 as current  # noqa: F401  (the interface: kernel.arch.current)
else:  # aarch64 is planned; say so instead of failing somewhere deep.
    raise UnsupportedError(f"hpcckpt supports x86_64 only so far; this machine is {_machine}")

NAME = _machine

"""x86_64: the ptrace register block, the syscall ABI and the syscall numbers we inject."""
import ctypes
import struct

_REG_NAMES = (
    "r15 r14 r13 r12 rbp rbx r11 r10 r9 r8 rax rcx rdx rsi rdi orig_rax "
    "rip cs eflags rsp ss fs_base gs_base ds es fs gs"
).split()


class Regs(ctypes.Structure):
    """struct user_regs_struct: what PTRACE_GETREGS returns (fs/gs base included)."""

    _fields_ = [(name, ctypes.c_ulonglong) for name in _REG_NAMES]

    def to_list(self) -> list[int]:
        return [getattr(self, n) for n in _REG_NAMES]

    @classmethod
    def from_list(cls, values: list[int]) -> "Regs":
        if len(values) != len(_REG_NAMES):
            raise ValueError(f"x86_64 register block needs {len(_REG_NAMES)} values, got {len(values)}")
        return cls(*values)

    def copy(self) -> "Regs":
        return Regs.from_buffer_copy(self)


SYSCALL_INSN = b"\x0f\x05"
# NT_X86_XSTATE: the whole xsave area (x87, SSE, AVX, AVX-512, AMX ...), variable size.
XSTATE_NOTE = 0x202
XSTATE_MAX = 16384

SYSCALLS = {
    "read": 0, "write": 1, "close": 3, "lseek": 8, "mmap": 9, "mprotect": 10,
    "munmap": 11, "brk": 12, "rt_sigaction": 13, "rt_sigprocmask": 14,
    "pread64": 17, "pwrite64": 18, "mremap": 25, "madvise": 28, "dup2": 33,
    "getitimer": 36, "setitimer": 38, "getpid": 39, "exit": 60, "kill": 62,
    "fcntl": 72, "ftruncate": 77, "chdir": 80, "fchdir": 81, "umask": 95,
    "setgroups": 116, "setresuid": 117, "setresgid": 119, "setfsuid": 122,
    "setfsgid": 123, "rt_sigqueueinfo": 129, "sigaltstack": 131, "personality": 135,
    "chroot": 161, "prctl": 157, "arch_prctl": 158, "gettid": 186, "set_tid_address": 218,
    "exit_group": 231, "tgkill": 234, "openat": 257, "set_robust_list": 273,
    "get_robust_list": 274, "dup3": 292, "pipe2": 293, "preadv": 295, "pwritev": 296, "rt_tgsigqueueinfo": 297, "prlimit64": 302,
    "memfd_create": 319, "rseq": 334, "pidfd_open": 434, "clone3": 435,
    "pidfd_getfd": 438, "userfaultfd": 323,
}

# used by the process-tree engine (sessions, groups, zombies, shared descriptions)
# live snapshots: a copy-on-write child of the frozen target (clone without CLONE_VM)
SYSCALLS.update({"clone": 56})
SYSCALLS.update({"wait4": 61, "setpgid": 109, "setsid": 112, "rt_sigtimedwait": 128, "kcmp": 312})
# SysV shared memory attachments and inotify/fanotify (engine/sysvipc.py, engine/fsnotify.py)
SYSCALLS.update({"shmat": 30, "inotify_add_watch": 254, "inotify_rm_watch": 255,
                 "inotify_init1": 294, "fanotify_init": 300, "fanotify_mark": 301,
                 "semop": 65, "unshare": 272})


def prepare_syscall(regs: Regs, nr: int, args: tuple[int, ...], ip: int) -> Regs:
    """Registers that make the thread execute syscall `nr` at `ip`.

    orig_rax = -1 keeps the kernel's syscall-restart logic from rewriting rax/rip
    of a thread that was stopped inside an interrupted syscall.
    """
    r = regs.copy()
    r.rax = nr
    r.orig_rax = 0xFFFFFFFFFFFFFFFF
    names = ("rdi", "rsi", "rdx", "r10", "r8", "r9")
    for name, value in zip(names, args):
        setattr(r, name, value & 0xFFFFFFFFFFFFFFFF)
    r.rip = ip
    return r


def syscall_return(regs: Regs) -> int:
    """The signed return value of the syscall just executed."""
    return signed(regs.rax)


def signed(v: int) -> int:
    """A 64-bit register value as a signed number."""
    return v - (1 << 64) if v >= (1 << 63) else v


def ip(regs: Regs) -> int:
    return regs.rip


def sp(regs: Regs) -> int:
    return regs.rsp

# Kernel-internal "restart me" codes a thread stopped inside a syscall may show in rax.
_RESTART_CODES = {-512, -513, -514, -516}  # ERESTARTSYS, NOINTR, NOHAND, RESTART_RESTARTBLOCK


# SysV IPC waits are never restarted by the kernel, not even after a mere stop (signal(7)):
# a thread that a freeze stopped in semop/msgrcv/msgsnd has EINTR in hand. Stopped right
# after such a call (orig_rax is only kept on the syscall exit path), it is re-issued.
_EINTR_REISSUED = {65, 220, 69, 70}   # semop, semtimedop, msgsnd, msgrcv


def _sysv_eintr(orig: int, r: Regs) -> bool:
    return orig in _EINTR_REISSUED and syscall_return(r) == -4


def reissue_sysv_wait(regs: Regs) -> Regs:
    """Registers for a thread going on after a freeze: a SysV IPC wait the freeze cut short
    with EINTR is made again, as if nothing had happened; anything else is left alone."""
    orig = regs.orig_rax - (1 << 64) if regs.orig_rax >= (1 << 63) else regs.orig_rax
    if not _sysv_eintr(orig, regs):
        return regs
    r = regs.copy()
    r.rax = orig
    r.rip -= len(SYSCALL_INSN)
    r.orig_rax = 0xFFFFFFFFFFFFFFFF
    return r


def rewind_interrupted_syscall(regs: Regs) -> Regs:
    """Registers that re-issue the syscall a thread was stopped in, on any kernel.

    The restart block of -ERESTART_RESTARTBLOCK is kernel state that a restore cannot
    carry, so that case re-runs the original syscall too (a sleep restarts whole).
    """
    r = regs.copy()
    orig = r.orig_rax - (1 << 64) if r.orig_rax >= (1 << 63) else r.orig_rax
    if orig >= 0 and (syscall_return(r) in _RESTART_CODES or _sysv_eintr(orig, r)):
        r.rax = orig
        r.rip -= len(SYSCALL_INSN)
    r.orig_rax = 0xFFFFFFFFFFFFFFFF
    return r

# POSIX timers, file locks, eventfd / timerfd / signalfd
SYSCALLS.update({"timer_create": 222, "timer_settime": 223, "timer_gettime": 224,
                 "timer_getoverrun": 225, "timer_delete": 226, "flock": 73, "ioctl": 16,
                 "eventfd2": 290, "timerfd_create": 283, "timerfd_settime": 286,
                 "timerfd_gettime": 287, "signalfd4": 289, "epoll_create1": 291,
                 "epoll_ctl": 233})
SYSCALLS.update({"socket": 41, "connect": 42, "sendto": 44, "accept4": 288, "shutdown": 48, "bind": 49,
                 "listen": 50, "getsockname": 51, "getpeername": 52, "socketpair": 53,
                 "setsockopt": 54, "getsockopt": 55})
# rootless restores hand back the capabilities their stubs held
SYSCALLS.update({"capset": 126})
# named listening unix sockets: a stale socket file replaced, its mode given back
SYSCALLS.update({"unlinkat": 263, "fchmodat": 268})


TRAP_INSN = b"\xcc"    # int3: ends a batch of syscalls (kernel/batch.py)
_ARG_MOVS = (b"\x48\xbf", b"\x48\xbe", b"\x48\xba", b"\x49\xba", b"\x49\xb8", b"\x49\xb9")  # movabs rdi,rsi,rdx,r10,r8,r9


def syscall_batch_code(calls: list[tuple[int, tuple[int, ...], int]]) -> bytes:
    """Machine code running each (nr, args, result address) syscall in turn, storing rax
    at its result address, then stopping on int3. Position independent (absolute
    operands only); uses no stack and no memory beyond the result addresses."""
    out = bytearray()
    for nr, args, result in calls:
        out += b"\x48\xb8" + struct.pack("<Q", nr)                      # movabs rax, nr
        for mov, value in zip(_ARG_MOVS, args):
            out += mov + struct.pack("<Q", value & 0xFFFFFFFFFFFFFFFF)
        out += SYSCALL_INSN
        out += b"\x48\xa3" + struct.pack("<Q", result)                  # movabs [result], rax
    return bytes(out + TRAP_INSN)

# a child made by machine code, running no Python before its exec (kernel/rawspawn.py)
SYSCALLS.update({"ptrace": 101, "execve": 59})


def _call_code(nr: int, args: tuple[int, ...]) -> bytes:
    out = b"\x48\xb8" + struct.pack("<Q", nr)                          # movabs rax, nr
    for mov, value in zip(_ARG_MOVS, args):
        out += mov + struct.pack("<Q", value & 0xFFFFFFFFFFFFFFFF)
    return out + SYSCALL_INSN


def fork_exec_code(fork: tuple[int, tuple[int, ...]], child: list[tuple[int, tuple[int, ...]]]) -> bytes:
    """A function (System V ABI, no arguments, returns long) that makes the `fork` syscall
    (a clone without CLONE_VM: the child runs on its own copy of our stack) and returns its
    result in the parent; the child makes the `child` syscalls in turn, ignoring their
    results (the last one an execve), then exit_group(127). Touches only rax, rcx, r11 and
    the argument registers, all caller-saved; the child uses no memory at all."""
    out = bytearray(_call_code(*fork))
    out += b"\x48\x85\xc0"      # test rax, rax
    out += b"\x74\x01"          # jz +1: the child (rax 0) skips the return
    out += b"\xc3"              # ret: the parent, with the PID or -errno
    for nr, args in child:
        out += _call_code(nr, args)
    out += _call_code(SYSCALLS["exit_group"], (127,))
    return bytes(out + b"\x0f\x0b")   # ud2: never reached

# syscalls with effects as one block of code (kernel/effects.py)
_ARG_LOADS = (b"\x48\x8b\x3f", b"\x48\x8b\x36", b"\x48\x8b\x12", b"\x4d\x8b\x12", b"\x4d\x8b\x00", b"\x4d\x8b\x09")  # mov reg, [reg]


def effect_block_code(calls: list[tuple[int, tuple[tuple[bool, int], ...], int, int | None]]) -> bytes:
    """Machine code making each (nr, args, result address, check) syscall in turn and
    storing rax at its result address, then an int3. An argument is (False, value) or
    (True, address of an earlier call's result). check None: any result goes on; -1: an
    errno (-4095..-1) jumps to the int3, stopping the block; else the result must be that
    value, or the block stops. Uses no stack; position independent (absolute operands,
    relative jumps)."""
    parts: list[tuple[bytes, bool]] = []     # (code, ends with a jump to the int3 to patch)
    for nr, args, result, check in calls:
        out = b"\x48\xb8" + struct.pack("<Q", nr)                      # movabs rax, nr
        for mov, load, (ref, value) in zip(_ARG_MOVS, _ARG_LOADS, args):
            out += mov + struct.pack("<Q", value & 0xFFFFFFFFFFFFFFFF)
            if ref:
                out += load
        out += SYSCALL_INSN + b"\x48\xa3" + struct.pack("<Q", result)   # movabs [result], rax
        if check is None:
            parts.append((out, False))
            continue
        if check == -1:
            out += b"\x48\x3d\x01\xf0\xff\xff"                         # cmp rax, -4095
            out += b"\x0f\x83"                                         # jae (unsigned): an errno
        else:
            out += b"\x48\xb9" + struct.pack("<Q", check & 0xFFFFFFFFFFFFFFFF)   # movabs rcx, check
            out += b"\x48\x39\xc8" + b"\x0f\x85"                       # cmp rax, rcx; jne
        parts.append((out, True))
    total = sum(len(c) + (4 if j else 0) for c, j in parts)
    code, pos = bytearray(), 0
    for c, jump in parts:
        code += c
        pos += len(c)
        if jump:
            pos += 4
            code += struct.pack("<i", total - pos)                     # to the int3
    return bytes(code + TRAP_INSN)

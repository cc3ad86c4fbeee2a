"""`hpcckpt check`: what this kernel offers for checkpointing, each probed for real.

Every probe runs the feature (on ourselves or a short-lived child), because config
files and version numbers lie: soft-dirty can be writable in clear_refs and never set.
"""
import ctypes
import errno
import mmap
import os
import signal
import struct
from dataclasses import dataclass

from . import proc, ptrace
from .arch import current as arch
from .libc import PAGE_SIZE, libc, raw_syscall


@dataclass
class Feature:
    name: str
    available: bool
    required: bool
    detail: str       # what it gives when available
    without: str      # what is lost without it


def _child() -> int:
    pid = os.fork()
    if pid == 0:
        try:
            signal.pause()
        finally:
            os._exit(0)
    return pid


def _reap(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


def _probe_ptrace() -> tuple[bool, str]:
    pid = _child()
    try:
        ptrace.seize(pid)
        ptrace.interrupt(pid)
        ptrace.wait_trap(pid)
        ptrace.get_regs(pid)
        xs = ptrace.get_regset(pid, arch.XSTATE_NOTE, arch.XSTATE_MAX)
        cfg = ptrace.get_rseq(pid)
        ptrace.detach(pid)
        return True, f"seize/interrupt, registers, {len(xs)}-byte xsave state, rseq at {cfg.rseq_abi_pointer:#x}"
    except Exception as e:
        return False, str(e)
    finally:
        _reap(pid)


def _probe_clone3_set_tid() -> tuple[bool, str]:
    # clone3 with set_tid on a PID that is taken must say EEXIST (not EPERM/ENOSYS).
    set_tid = (ctypes.c_int * 1)(os.getpid())
    args = ctypes.create_string_buffer(struct.pack("<11Q", 0, 0, 0, 0, signal.SIGCHLD, 0, 0, 0,
                                                   ctypes.addressof(set_tid), 1, 0))
    res = libc.syscall(ctypes.c_long(arch.SYSCALLS["clone3"]), args, ctypes.c_long(88))
    e = ctypes.get_errno()
    if res == 0:
        os._exit(0)
    if res > 0:
        os.waitpid(res, 0)
        return False, "clone3 ignored set_tid"
    return e == errno.EEXIST, "PIDs and TIDs given back on restore" if e == errno.EEXIST else os.strerror(e)


def _probe_uffd_wp() -> tuple[bool, str]:
    try:
        fd = raw_syscall(323, os.O_CLOEXEC | os.O_NONBLOCK)  # userfaultfd
    except OSError as e:
        return False, f"userfaultfd: {e.strerror}"
    try:
        api = ctypes.create_string_buffer(struct.pack("<QQQ", 0xAA, (1 << 15) | (1 << 13), 0))
        res = libc.ioctl(fd, ctypes.c_ulong(0xC018AA3F), api)
        if res < 0:
            return False, f"UFFD_FEATURE_WP_ASYNC: {os.strerror(ctypes.get_errno())}"
        return True, "write-protect in async mode"
    finally:
        os.close(fd)


def _probe_pagemap_scan() -> tuple[bool, str]:
    m = mmap.mmap(-1, PAGE_SIZE)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
    try:
        fd = os.open("/proc/self/pagemap", os.O_RDONLY)
        try:
            buf = ctypes.create_string_buffer(16 * 4)
            arg = ctypes.create_string_buffer(struct.pack(
                "<12Q", 96, 0, addr, addr + PAGE_SIZE, 0, ctypes.addressof(buf), 4, 0, 0, 0, 0, 0))
            res = libc.ioctl(fd, ctypes.c_ulong(0xC0606610), arg)
            if res < 0:
                return False, os.strerror(ctypes.get_errno())
            return True, "dirty pages read and re-armed in one call"
        finally:
            os.close(fd)
    finally:
        m.close()


def _probe_soft_dirty() -> tuple[bool, str]:
    pid = os.fork()
    if pid == 0:
        try:
            m = mmap.mmap(-1, PAGE_SIZE)
            m[0] = 1
            with open("/proc/self/clear_refs", "w") as f:
                f.write("4")
            m[0] = 2
            addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
            ent = proc.pagemap(os.getpid(), addr, addr + PAGE_SIZE)[0]
            os._exit(0 if int(ent) >> 55 & 1 else 1)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    ok = os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    return ok, "page bit 55 set after a write" if ok else "bit 55 never set (CONFIG_MEM_SOFT_DIRTY off)"


def _probe_checkpoint_restore_caps() -> tuple[bool, str]:
    st = proc.status(os.getpid())
    eff = int(st["CapEff"], 16)
    ok = bool(eff & (1 << 21)) or bool(eff & (1 << 40))  # CAP_SYS_ADMIN or CAP_CHECKPOINT_RESTORE
    return ok, "CAP_SYS_ADMIN or CAP_CHECKPOINT_RESTORE present" if ok else "neither capability"


def _probe_vdso() -> tuple[bool, str]:
    from . import vdso
    lay = vdso.layout()
    return "[vdso]" in lay, ", ".join(f"{k} {v.size // 1024} KiB" for k, v in lay.items())


PROBES = [
    ("ptrace (seize, regsets, rseq config)", True, _probe_ptrace, "no dump at all"),
    ("clone3 with set_tid", True, _probe_clone3_set_tid, "no restore: PIDs cannot be given back"),
    ("checkpoint/restore capability", True, _probe_checkpoint_restore_caps,
     "restore impossible (PR_SET_MM_MAP and set_tid need it)"),
    ("vDSO present", False, _probe_vdso, "processes without vDSO only"),
    ("userfaultfd write-protect", False, _probe_uffd_wp, "incremental dumps fall back to soft-dirty or hashing"),
    ("PAGEMAP_SCAN", False, _probe_pagemap_scan, "write-protect tracking unavailable"),
    ("soft-dirty", False, _probe_soft_dirty, "incremental dumps use write-protect or hashing"),
]


def probe() -> list[Feature]:
    out = []
    for name, required, fn, without in PROBES:
        ok, detail = fn()
        out.append(Feature(name, ok, required, detail, without if not ok else ""))
    return out

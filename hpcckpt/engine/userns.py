"""Rootless runs: a user namespace of the job's own, so an ordinary user can checkpoint and restore.

Restoring needs powers an ordinary user lacks on the host: choosing PIDs (clone3 set_tid)
and replacing a process' memory layout and /proc/PID/exe (PR_SET_MM_MAP). The kernel grants
both to whoever holds CAP_SYS_ADMIN or CAP_CHECKPOINT_RESTORE over the PID namespace, and a
user who creates a user namespace holds every capability in it and in the namespaces
created from it. So `hpcckpt run` by a non-root user first enters a user namespace that
maps the user to itself (the job still sees its own uid and gid, files keep their owners;
supplementary groups still grant access but show as `nogroup`), then makes its PID
namespace inside. Nothing on the host becomes possible that the user could not do already.

Restore stubs exec /bin/true as the user, which would drop those capabilities; they keep
the two a restore needs as ambient capabilities, and the restore takes them away again
before the process runs (restore._drop_creds), so the job never holds them.
"""
from __future__ import annotations

import ctypes
import os

from ..errors import KernelError
from ..kernel.libc import libc

CLONE_NEWUSER = 0x10000000
CAP_SYS_ADMIN, CAP_CHECKPOINT_RESTORE = 21, 40
PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, PR_CAP_AMBIENT_CLEAR_ALL = 47, 2, 4
CAP_V3 = 0x20080522
STUB_CAPS = (CAP_SYS_ADMIN, CAP_CHECKPOINT_RESTORE)

_active = False


def active() -> bool:
    """Whether this process made a user namespace for its job (rootless mode)."""
    return _active


def enter_if_unprivileged() -> None:
    """Enter a user namespace mapping us to ourselves when we are not root. Must run while
    the process is single-threaded (the kernel refuses unshare(CLONE_NEWUSER) otherwise)."""
    global _active
    if _active or os.geteuid() == 0:
        return
    uid, gid = os.geteuid(), os.getegid()
    if libc.unshare(CLONE_NEWUSER) != 0:
        err = os.strerror(ctypes.get_errno())
        raise KernelError(
            f"cannot create a user namespace for a rootless run ({err}): this node forbids them "
            "(sysctl user.max_user_namespaces / kernel.unprivileged_userns_clone); ask the site to "
            "allow them, or checkpoint through the node service (hpcckptd)")
    for name, text in (("uid_map", f"{uid} {uid} 1\n"), ("setgroups", "deny\n"), ("gid_map", f"{gid} {gid} 1\n")):
        with open(f"/proc/self/{name}", "w") as f:
            f.write(text)
    _active = True


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def stub_cap_calls(put) -> list[tuple[str, tuple[int, ...]]]:
    """The syscalls a stub's child makes before its exec to keep what a restore needs
    across it (none outside a rootless run). Computed here, before the clone: the child
    has our thread's capabilities and runs no Python (kernel/rawspawn.py); `put` places
    the capset data where the child can read it."""
    if not _active:
        return []
    hdr, data = _CapHeader(CAP_V3, 0), (_CapData * 2)()
    if libc.capget(ctypes.byref(hdr), data) != 0:
        return []
    for cap in STUB_CAPS:
        data[cap // 32].inheritable |= 1 << (cap % 32)
    calls = [("capset", (put(bytes(hdr)), put(bytes(data))))]
    return calls + [("prctl", (PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, cap, 0, 0)) for cap in STUB_CAPS]


def cap_sets(eff: int, prm: int, inh: int) -> bytes:
    """The capset(2) data block (version 3: two 32-bit halves) for the given 64-bit sets."""
    data = (_CapData * 2)()
    for i in range(2):
        data[i].effective = (eff >> (32 * i)) & 0xFFFFFFFF
        data[i].permitted = (prm >> (32 * i)) & 0xFFFFFFFF
        data[i].inheritable = (inh >> (32 * i)) & 0xFFFFFFFF
    return bytes(data)


def cap_header() -> bytes:
    return bytes(_CapHeader(CAP_V3, 0))

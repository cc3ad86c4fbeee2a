"""Who may do what: credentials from the kernel, checked against the target and images.

A non-root caller may dump only processes that run entirely with its own credentials
(real, effective, saved and fs uid and gid), hold no capabilities and are dumpable (not
setuid/setgid, not made undumpable), and write images only where it could itself; it may
restore only images it owns, which then run with its own credentials.
"""
import ctypes
import importlib.abc
import importlib.machinery
import os
import socket
import stat
import struct
import subprocess
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..errors import PermissionDeniedError, ProcessGoneError
from ..kernel import proc
from ..kernel.arch import current as arch
from ..kernel.libc import libc, raw_syscall

SO_PEERCRED = 17
SO_PEERGROUPS = 59
MAX_GROUPS = 65536


@dataclass(frozen=True)
class Caller:
    pid: int
    uid: int
    gid: int
    groups: tuple[int, ...] = ()     # supplementary groups, as the kernel saw them at connect

    @property
    def root(self) -> bool:
        return self.uid == 0


def peer(sock: socket.socket) -> Caller:
    pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, SO_PEERCRED, 12))
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 4 * MAX_GROUPS)
        groups = struct.unpack(f"{len(raw) // 4}I", raw)
    except OSError:     # not a Unix socket's peer: the primary group only
        groups = ()
    return Caller(pid, uid, gid, tuple(groups))


def groups_of(uid: int, gid: int) -> tuple[int, ...]:
    """A user's groups by name service (for a caller known by munge, not by a socket)."""
    import pwd
    try:
        return tuple(os.getgrouplist(pwd.getpwuid(uid).pw_name, gid))
    except KeyError:
        return (gid,)


def _set_groups(groups: list[int]) -> None:
    """setgroups for this thread only (the raw syscall; glibc's changes every thread)."""
    arr = (ctypes.c_uint * max(len(groups), 1))(*groups)
    raw_syscall(arch.SYSCALLS["setgroups"], len(groups), ctypes.addressof(arr))


_acting = threading.local()


def _fs_root(on: bool) -> None:
    c = _acting.caller
    libc.setfsuid(0 if on else c.uid)
    libc.setfsgid(0 if on else c.gid)
    if not on:
        _read_anything()


class _AsRoot:
    """A module loader run with root's file credentials (see _RootImports)."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        _fs_root(True)
        try:
            return self._loader.create_module(spec)
        finally:
            _fs_root(False)

    def exec_module(self, module):
        _fs_root(True)
        try:
            return self._loader.exec_module(module)
        finally:
            _fs_root(False)

    def __getattr__(self, name):
        return getattr(self._loader, name)


class _RootImports(importlib.abc.MetaPathFinder):
    """While a thread acts as a user, Python may still import the modules the engine, the
    store or numpy load lazily (zipfile, encodings ...) from root's library directories,
    which the user may not be able to read: finding and loading go back to root's file
    credentials for that moment only."""

    def find_spec(self, name, path, target=None):
        if getattr(_acting, "caller", None) is None:
            return None
        _fs_root(True)
        try:
            spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        finally:
            _fs_root(False)
        if spec is not None and spec.loader is not None:
            spec.loader = _AsRoot(spec.loader)
        return spec


sys.meta_path.insert(0, _RootImports())

_execute_child = subprocess.Popen._execute_child


def _execute_child_as_root(self, *args, **kwargs):
    """Programs the engine starts while we act as a user (the tracking holder, nft for
    TCP locks) are hpcckpt's own root helpers: they are started, and run, with root's file
    credentials (a child inherits the forking thread's), not refused because the user
    cannot read root's Python."""
    if getattr(_acting, "caller", None) is None:
        return _execute_child(self, *args, **kwargs)
    _fs_root(True)
    try:
        return _execute_child(self, *args, **kwargs)
    finally:
        _fs_root(False)


subprocess.Popen._execute_child = _execute_child_as_root


_LINUX_CAPABILITY_VERSION_3 = 0x20080522
CAP_DAC_READ_SEARCH = 2
SYS_CAPGET = 125


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _read_anything() -> None:
    """Raise CAP_DAC_READ_SEARCH again in this thread (the fsuid change dropped it): the
    engine goes on reading /proc, root's helpers and libraries as root, while every write
    and create is still checked as the caller (CAP_DAC_OVERRIDE, CAP_FOWNER stay down)."""
    hdr = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    raw_syscall(SYS_CAPGET, ctypes.addressof(hdr), ctypes.addressof(data))
    data[0].effective |= 1 << CAP_DAC_READ_SEARCH
    raw_syscall(arch.SYSCALLS["capset"], ctypes.addressof(hdr), ctypes.addressof(data))


@contextmanager
def acting_as(caller: Caller):
    """Use the file system as the caller would, in this thread: its fsuid, fsgid and groups.

    Root's file capabilities (DAC override, chown, fowner) drop with the fsuid, so every
    file created belongs to the caller, and a directory, store, parent image or symlink
    the caller could not write or read fails as it would for the caller itself: a user's
    store or image directory can never steer root's writes elsewhere. ptrace and
    CAP_SYS_ADMIN stay, so the engine still reads the caller's own processes."""
    if caller.root:
        yield
        return
    old_groups = os.getgroups()
    _set_groups(list(caller.groups) or [caller.gid])
    _acting.caller = caller
    _fs_root(False)
    _read_anything()
    try:
        yield
    finally:
        libc.setfsuid(0)
        libc.setfsgid(0)
        _acting.caller = None
        _set_groups(old_groups)


def refused(e: PermissionError, caller: Caller, what: str) -> PermissionDeniedError:
    """EACCES met while acting as the caller, said as the refusal it is."""
    where = f" ({e.filename})" if e.filename else ""
    return PermissionDeniedError(f"you (uid {caller.uid}) may not {what}: {e.strerror}{where}")


def may_use_parent(caller: Caller, parent: str) -> Path:
    """A parent image must be the caller's: its pages become part of the caller's image."""
    path = Path(parent)
    if not path.is_absolute():
        raise PermissionDeniedError(f"parent image path {parent!r} must be absolute")
    if caller.root:
        return path
    try:
        owner = (path / "inventory.img").stat().st_uid
    except FileNotFoundError:
        raise PermissionDeniedError(f"parent image {path} has no inventory.img: not an image") from None
    if owner != caller.uid:
        raise PermissionDeniedError(f"parent image {path} belongs to uid {owner}, not to you (uid {caller.uid})")
    return path


def may_dump(caller: Caller, pid: int, root: int | None = None) -> None:
    """`root`: pid is a member of root's tree (a zombie or a process gone meanwhile passes:
    it has no memory left to give away)."""
    if caller.root:
        return
    try:
        st = proc.status(pid)
        if root is not None and st.get("State", "").startswith(("Z", "X")):
            return
    except ProcessGoneError:
        if root is not None:
            return
        raise
    uids = {int(x) for x in st["Uid"].split()}
    gids = {int(x) for x in st["Gid"].split()}
    if uids != {caller.uid} or gids != {caller.gid}:
        raise PermissionDeniedError(
            f"process {pid}{f' (in the tree of {root})' if root not in (None, pid) else ''} does not run "
            f"entirely as you (uid {caller.uid}, gid {caller.gid}): "
            f"its uids are {st['Uid']}, gids {st['Gid']}; you may dump only your own processes")
    if int(st.get("CapEff", "0"), 16) or int(st.get("CapPrm", "0"), 16):
        raise PermissionDeniedError(f"process {pid} holds capabilities you do not have: refused")
    # the kernel hands /proc/PID to root when a process is not dumpable (setuid, setgid,
    # PR_SET_DUMPABLE 0): then it keeps secrets its owner may not read
    if os.stat(f"/proc/{pid}").st_uid != caller.uid:
        raise PermissionDeniedError(f"process {pid} is not dumpable (setuid, setgid or PR_SET_DUMPABLE 0): refused")


def may_write_images(caller: Caller, images: str) -> Path:
    """The new image directory's parent must be one the caller could create it in."""
    path = Path(images)
    if not path.is_absolute():
        raise PermissionDeniedError(f"image path {images!r} must be absolute")
    if caller.root:
        return path
    if path.exists():
        raise PermissionDeniedError(f"{path} exists already: name a new directory for the images")
    parent = path.parent
    try:
        st = parent.stat()
    except FileNotFoundError:
        raise PermissionDeniedError(f"{parent} does not exist") from None
    owner_ok = st.st_uid == caller.uid and st.st_mode & stat.S_IWUSR
    world_ok = st.st_mode & stat.S_IWOTH and st.st_mode & stat.S_ISVTX
    if not stat.S_ISDIR(st.st_mode) or not (owner_ok or world_ok):
        raise PermissionDeniedError(f"you (uid {caller.uid}) may not create {path}: {parent} is not yours")
    return path


def may_restore(caller: Caller, images: str) -> Path:
    path = Path(images)
    if not path.is_absolute():
        raise PermissionDeniedError(f"image path {images!r} must be absolute")
    if caller.root:
        return path
    inv = path / "inventory.img"
    try:
        owner = inv.stat().st_uid
    except FileNotFoundError:
        return path  # the engine names the missing inventory
    if owner != caller.uid:
        raise PermissionDeniedError(f"image {path} belongs to uid {owner}, not to you (uid {caller.uid})")
    return path


def give_to(caller: Caller, path: Path) -> None:
    """Images dumped for a user belong to that user."""
    if caller.root:
        return
    os.chown(path, caller.uid, caller.gid)
    for p in path.iterdir():
        os.chown(p, caller.uid, caller.gid)

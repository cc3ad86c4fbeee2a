"""Who may do what: credentials from the kernel, checked against the target and images.

A non-root caller may dump only processes that run entirely with its own credentials
(real, effective, saved and fs uid and gid), hold no capabilities and are dumpable (not
setuid/setgid, not made undumpable), and write images only where it could itself; it may
restore only images it owns, which then run with its own credentials.
"""
import os
import socket
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

from ..errors import PermissionDeniedError
from ..kernel import proc

SO_PEERCRED = 17


@dataclass(frozen=True)
class Caller:
    pid: int
    uid: int
    gid: int

    @property
    def root(self) -> bool:
        return self.uid == 0


def peer(sock: socket.socket) -> Caller:
    pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, SO_PEERCRED, 12))
    return Caller(pid, uid, gid)


def may_dump(caller: Caller, pid: int) -> None:
    if caller.root:
        return
    st = proc.status(pid)
    uids = {int(x) for x in st["Uid"].split()}
    gids = {int(x) for x in st["Gid"].split()}
    if uids != {caller.uid} or gids != {caller.gid}:
        raise PermissionDeniedError(
            f"process {pid} does not run entirely as you (uid {caller.uid}, gid {caller.gid}): "
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
